"""Shared test setup: the scripts import from the repo root, the hub is never contacted, tiny assets are built once."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["HF_HUB_OFFLINE"] = "1"  # tests build their own tiny models; a hub call would be a bug
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="session")
def ppo_assets(tmp_path_factory):
    """Tiny GPT-2, DistilBERT classifier and review set, built by the script's own preset code."""
    import ppo_gpt2_imdb

    directory = str(tmp_path_factory.mktemp("ppo_tiny_assets"))
    ppo_gpt2_imdb.build_tiny_assets(directory)
    return directory


@pytest.fixture(scope="session")
def dpo_assets(tmp_path_factory):
    """Tiny Llama, Llama-style tokenizer and preference set, built by the DPO script's own preset code."""
    import dpo_llama2_stackexchange

    directory = str(tmp_path_factory.mktemp("dpo_tiny_assets"))
    dpo_llama2_stackexchange.build_tiny_assets(directory)
    return directory


def stops_with(pattern, call, *args):
    """`call(*args)` must stop with a SystemExit whose paragraph (whitespace folded) matches `pattern`."""
    import re

    with pytest.raises(SystemExit) as stopped:
        call(*args)
    message = " ".join(str(stopped.value).split())
    assert re.search(pattern, message), message
    return str(stopped.value)


def accelerate_launch(script: str, args: list, processes: int = 2, timeout: int = 900):
    """Run `accelerate launch --multi_gpu --num_processes N script args` from the repo root, on a free port.
    On a machine without GPUs this starts N CPU processes joined over gloo (accelerate 1.15's `--cpu` flag starts
    only one process: its multi-CPU launcher needs mpirun)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), script, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_then_sigterm(script: str, args: list, seconds_into_training: float = 3.0):
    """Start `python script args`, send SIGTERM a few seconds after it prints "Training:", and return its exit
    code and everything it printed (stdout and stderr together)."""
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, script, *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith("Training:"):
            time.sleep(seconds_into_training)
            child.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + child.stdout.read()
    return child.wait(timeout=120), output


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """No API key, no ~/.netrc, no WANDB_MODE, and standard input that is not a terminal."""
    import sys

    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
