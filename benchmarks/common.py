"""Shared by the benchmark scripts: run a training script as a child process, measure it, record the result."""
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "RESULTS.md")
sys.path.insert(0, REPO)


def hardware() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


def versions() -> dict:
    return {name: metadata.version(name) for name in ("torch", "trl", "transformers", "peft", "bitsandbytes")}


def run_script(command: list[str]) -> dict:
    """Run `python <command>` from the repo root; return wall seconds, the child's peak RSS and its exit code."""
    started = time.time()
    child = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # resource usage of this child alone
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark run failed: python {' '.join(command)}\n{output[-4000:]}")
    return {"wall_seconds": round(time.time() - started, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def record(benchmark: str, settings: dict, figures: dict) -> dict:
    """Print one JSON line and append a row to benchmarks/RESULTS.md."""
    row = {"benchmark": benchmark, "date": datetime.date.today().isoformat(), "hardware": hardware(),
           "versions": versions(), "settings": settings, "figures": figures}
    print(json.dumps(row), flush=True)
    if not os.path.exists(RESULTS):
        with open(RESULTS, "w") as handle:
            handle.write("# Benchmark results\n\nAppended by `benchmarks/bench_ppo.py` and `benchmarks/bench_dpo.py`; "
                         "see the README's Benchmarks section for what each figure means.\n\n"
                         "| date | benchmark | hardware | settings | figures |\n| --- | --- | --- | --- | --- |\n")
    machine = row["hardware"]["gpu"] or f"{row['hardware']['cpu']} ({row['hardware']['cores']} cores)"
    cells = [row["date"], benchmark, machine, ", ".join(f"{k}={v}" for k, v in settings.items()),
             ", ".join(f"{k}={v}" for k, v in figures.items())]
    with open(RESULTS, "a") as handle:
        handle.write("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |\n")
    return row
