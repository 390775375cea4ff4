"""Run a training script with every optimizer step timed: `python benchmarks/step_timer.py OUT.json SCRIPT ARGS...`.

Adds one callback to every Trainer the script builds (TRL's PPO and DPO trainers both run Trainer callbacks), which
records the wall time at the start of training and at the end of each PPO update / DPO step (CUDA synchronised), and
the first logged loss. The benchmarks time the current scripts and older copies of them this way, so that both are
measured alike without either having to record it.

With STEP_TIMER_PROFILE=N:PATH in the environment, step N (2 or later: the first one warms up) also runs under
torch.profiler, and PATH gets its operations ranked by GPU time and by CPU time: where an update's time goes. The
profile counts the step's PyTorch operations called from Python or autograd (compiled regions count only the
library calls they make) and, on a GPU, its kernel launches (a CUDA graph replay counts as one) and the seconds in
which the GPU ran any kernel. Busy time well under the step's wall time means the GPU waited for the host (Python,
launches, the reward's text round trip): fewer operations pay there, not fewer FLOPs. Profiling slows that step,
the next (which writes the table) and, measured at GPT-2 size, the later ones too (its retained memory): the
benchmarks profile in a run of their own and time only unprofiled runs."""
import json
import os
import runpy
import sys
import time

from transformers.trainer_callback import CallbackHandler, TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self, path: str, profile: str = ""):
        self.path, self.marks, self.first_loss = path, [], None
        step, _, self.profile_path = profile.partition(":")
        self.profile_step, self.profiler = int(step) if step else None, None
        self.counts = {}  # operations and kernel launches of the profiled step

    @staticmethod
    def now() -> float:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # GPU work is queued: wait for it, or its time lands in the next step
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [self.now()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(self.now())
        steps_done = len(self.marks) - 1
        if self.profile_step and steps_done == self.profile_step - 1:
            self.profiler = profile_one_step()
        elif self.profiler is not None and steps_done == self.profile_step:
            self.profiler.__exit__(None, None, None)
            seconds = self.marks[-1] - self.marks[-2]
            self.counts = {**count_events(self.profiler), "step_seconds": round(seconds, 4)}
            write_profile(self.profiler, self.profile_path, self.profile_step, seconds, self.counts)
            self.profiler = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.first_loss is None and logs and "loss" in logs:
            self.first_loss = logs["loss"]

    def on_train_end(self, args, state, control, **kwargs):
        steps = [round(b - a, 4) for a, b in zip(self.marks, self.marks[1:])]
        if self.profile_step and not self.counts:
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
            with open(self.profile_path, "w") as handle:
                handle.write(f"No profile: training ended after {len(steps)} steps, before step {self.profile_step}.\n")
        with open(self.path, "w") as handle:
            json.dump({"step_seconds": steps, "first_loss": self.first_loss, "profiled_step_counts": self.counts},
                      handle)


def count_events(profiler) -> dict:
    """PyTorch operations called from Python or autograd (aten events whose parent is not an aten event) and, on a
    GPU, kernel launches (CUDA runtime/driver launch calls; a CUDA graph replay is one) with the kernels the GPU ran
    as a cross-check (None where no GPU activity was recorded), and the seconds in which any kernel ran: set against
    the step's wall time, what is left is time the GPU waited for the host."""
    from torch.autograd import DeviceType

    operations = launches = kernels = 0
    kernel_spans = []
    for event in profiler.events():
        parent = event.cpu_parent
        if event.device_type == DeviceType.CUDA:
            kernels += 1
            kernel_spans.append((event.time_range.start, event.time_range.end))
        elif event.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            operations += 1
        elif "LaunchKernel" in event.name or event.name.startswith("cudaGraphLaunch"):
            launches += 1
    return {"operations": operations, "kernel_launches": launches if kernels else None,
            "gpu_kernels": kernels or None,
            "gpu_busy_seconds": round(busy_microseconds(kernel_spans) / 1e6, 4) if kernels else None}


def busy_microseconds(spans: list) -> float:
    """Length of the union of (start, end) intervals: kernels on several streams may overlap, and time in which two
    ran at once is busy time once."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def profile_one_step():
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def write_profile(profiler, path: str, step: int, seconds: float, counts: dict):
    import torch

    averages = profiler.key_averages()
    launches = (f", {counts['kernel_launches']} kernel launches ({counts['gpu_kernels']} kernels ran on the GPU, "
                f"busy {counts['gpu_busy_seconds']:.4f} s of the step: {counts['gpu_busy_seconds'] / seconds:.0%})"
                if counts["kernel_launches"] is not None else "")
    tables = [f"Step {step}: {seconds:.4f} s of wall time (profiled, so slower than unprofiled steps); "
              f"{counts['operations']} PyTorch operations{launches}."]
    if torch.cuda.is_available():
        tables += ["\nBy GPU time:", averages.table(sort_by="self_device_time_total", row_limit=30)]
    tables += ["\nBy CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    with open(path, "w") as handle:
        handle.write("\n".join(tables) + "\n")


def install(path: str):
    original = CallbackHandler.__init__
    profile = os.environ.get("STEP_TIMER_PROFILE", "")

    def with_timer(self, callbacks, *args, **kwargs):
        original(self, [*callbacks, StepTimer(path, profile)], *args, **kwargs)

    CallbackHandler.__init__ = with_timer


def steady(step_seconds: list, warm_up: int = 1) -> dict:
    """First step (warm-up and any compilation) apart; mean seconds of the steps after it."""
    rest = step_seconds[warm_up:] or step_seconds
    return {"first_step_seconds": step_seconds[0] if step_seconds else None,
            "steady_seconds_per_step": round(sum(rest) / len(rest), 4) if rest else None}


if __name__ == "__main__":
    out, script, *script_args = sys.argv[1:]
    install(os.path.abspath(out))
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
