"""Run a training script with every optimizer step timed: `python benchmarks/step_timer.py OUT.json SCRIPT ARGS...`.

Adds one callback to every Trainer the script builds (TRL's PPO and DPO trainers both run Trainer callbacks), which
records the wall time at the start of training and at the end of each PPO update / DPO step (CUDA synchronised), and
the first logged loss. The benchmarks time the current scripts and older copies of them this way, so that both are
measured alike without either having to record it."""
import json
import os
import runpy
import sys
import time

from transformers.trainer_callback import CallbackHandler, TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self, path: str):
        self.path, self.marks, self.first_loss = path, [], None

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

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.first_loss is None and logs and "loss" in logs:
            self.first_loss = logs["loss"]

    def on_train_end(self, args, state, control, **kwargs):
        steps = [round(b - a, 4) for a, b in zip(self.marks, self.marks[1:])]
        with open(self.path, "w") as handle:
            json.dump({"step_seconds": steps, "first_loss": self.first_loss}, handle)


def install(path: str):
    original = CallbackHandler.__init__

    def with_timer(self, callbacks, *args, **kwargs):
        original(self, [*callbacks, StepTimer(path)], *args, **kwargs)

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
