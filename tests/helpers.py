"""Helpers shared by the tests: run a script's tiny preset (in this process or as a command), send it signals, launch
two processes, and read what the tiny builders make visible."""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PPO_SCRIPT, DPO_SCRIPT = "ppo_gpt2_imdb.py", "dpo_llama2_stackexchange.py"
HUB = r"(couldn't connect to 'https://huggingface.co'|Couldn't reach)"  # transformers' and datasets' words, offline


def tiny_argv(assets: str, output_dir, *extra) -> list:
    """The tiny preset on already built assets, without a tracker (tests that need one pass --report_to)."""
    return ["--preset", "tiny", "--tiny_assets_dir", str(assets), "--output_dir", str(output_dir), "--report_to",
            "none", *map(str, extra)]


def run_tiny(module, assets: str, output_dir, *extra) -> dict:
    """The script's main() in this process on the tiny preset; returns what eval.json holds."""
    return module.main(module.parse_args(tiny_argv(assets, output_dir, *extra)))


def stops_with(pattern: str, call, *args) -> str:
    """`call(*args)` must stop with a SystemExit whose paragraph (whitespace folded) matches `pattern`."""
    with pytest.raises(SystemExit) as stopped:
        call(*args)
    message = " ".join(str(stopped.value).split())
    assert re.search(pattern, message), message
    return str(stopped.value)


def child_env(**extra) -> dict:
    """This process's environment (same thread count, so the same floating-point results), unbuffered output."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def run_cli(script: str, argv: list, timeout: int = 600, cwd: str = REPO, **env) -> subprocess.CompletedProcess:
    """`python script argv` as a user runs it; stdout and stderr kept apart."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=child_env(**env))


def run_then_signal(script: str, argv: list, after_line: str, delay: float = 2.0, sig=signal.SIGTERM,
                    again_on_line: str = None, timeout: float = 300, cwd: str = REPO):
    """Start `python script argv`, send `sig` `delay` seconds after a line starting with `after_line` appears (and
    once more when the child then prints a line starting with `again_on_line`, if given); return (exit code,
    everything printed, seconds from the first signal to the exit). Unbuffered output, a deadline on everything, and
    the child is always reaped. Two signals sent back to back can reach Python as one (its handler runs between
    bytecodes, and a signal pending twice is handled once): `again_on_line` waits for the child to have handled the
    first."""
    child = subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, argv)], cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    deadline, lines, signalled = time.monotonic() + timeout, [], None
    try:
        for line in child.stdout:  # the child's output is unbuffered: lines arrive as printed
            lines.append(line)
            if signalled is None and line.startswith(after_line):
                time.sleep(delay)
                child.send_signal(sig)
                signalled = time.monotonic()
                if again_on_line is None:
                    break
            elif signalled is not None and again_on_line is not None and line.startswith(again_on_line):
                child.send_signal(sig)
                break
            if time.monotonic() > deadline:
                break
        remaining = max(1.0, deadline - time.monotonic())
        output, _ = child.communicate(timeout=remaining)
        code = child.returncode
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return code, "".join(lines) + (output or ""), (time.monotonic() - signalled) if signalled else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(script: str, argv: list, processes: int = 2) -> list:
    """`accelerate launch --multi_gpu --num_processes N script argv`, on a free port. On a machine without GPUs this
    starts N CPU processes joined over gloo (accelerate 1.15's `--cpu` flag starts only one process: its multi-CPU
    launcher needs mpirun)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), script, *map(str, argv)]


def accelerate_launch(script: str, argv: list, processes: int = 2, timeout: int = 900):
    """The launch_command run from the repo root to its end."""
    return subprocess.run(launch_command(script, argv, processes), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env(OMP_NUM_THREADS="1"))  # two processes on the machine's cores


def launch_then_interrupt(script: str, argv: list, after: str, timeout: float = 600):
    """The launch_command in a process group of its own, and SIGINT to the whole group once a line (or progress bar
    update) matching the pattern `after` appears, as a terminal's Ctrl-C reaches the launcher and every process.
    Returns (exit code, everything printed)."""
    child = subprocess.Popen(launch_command(script, argv), cwd=REPO, stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.STDOUT, env=child_env(OMP_NUM_THREADS="1"), start_new_session=True)
    lines = []
    try:
        for line in child.stdout:  # text mode reads tqdm's carriage returns as line ends
            lines.append(line)
            if re.search(after, line):
                os.killpg(child.pid, signal.SIGINT)
                break
        output, _ = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return child.returncode, "".join(lines) + (output or "")


def run_printed_launch(command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """A printed `accelerate launch ...` command as printed, by this environment's accelerate, on a free port."""
    tokens = shlex.split(command)
    assert tokens[:2] == ["accelerate", "launch"], command
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port",
                           str(free_port()), *tokens[2:]], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=child_env(OMP_NUM_THREADS="1"))


def on_a_small_disk(script: str, argv: list, out, kib: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python script argv` with `out` on a tmpfs of `kib` KiB, which really fills, mounted in a mount namespace of
    its own (`unshare`: nothing outside sees it, and it goes when the run ends). What the run left there is then
    copied to `out` on the real disk, for the test to read and go on from. Skips where no tmpfs can be mounted."""
    os.makedirs(out, exist_ok=True)
    left = f"{out}.left"
    shell = f'mount -t tmpfs -o size={kib}k tmpfs "$0" || exit 99; "${{@:2}}"; code=$?; cp -a "$0/." "$1"; exit $code'
    command = ["unshare", "--mount", "--map-root-user", "bash", "-c", shell, str(out), left, sys.executable,
               os.path.join(REPO, script), *map(str, argv)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=child_env())
    if completed.returncode == 99 or completed.stderr.startswith("unshare:"):
        pytest.skip(f"no tmpfs can be mounted here: {completed.stderr.strip()}")
    shutil.copytree(left, out, dirs_exist_ok=True)
    shutil.rmtree(left)
    return completed


def sentiment_words(samples: list, words: list) -> int:
    """How often any of `words` (the tiny review builder's GOOD or BAD adjectives) occurs in the responses."""
    pattern = re.compile(r"\b(" + "|".join(words) + r")\b")
    return sum(len(pattern.findall(sample["response"].lower())) for sample in samples)


def right_tool_share(generations: list, tasks: dict) -> float:
    """Share of generated answers that name the tool the tiny preference set prefers for the question's task."""
    hits = 0
    for generation in generations:
        task = next(task for task in tasks if f"How do I {task} " in generation["prompt"])
        hits += tasks[task] in generation["answer"]
    return hits / len(generations)


def as_if_interrupted_after_its_checkpoints(out):
    """A finished run's directory made to look like one stopped after its last checkpoint: no eval.json, no saved
    weights (a saved model alone counts as a finished run whose evaluation was cut short)."""
    for path in [out / "eval.json", *out.glob("*.safetensors")]:
        path.unlink(missing_ok=True)
