"""Shared by the benchmark scripts: run a training script as a child process, measure it, record the result."""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "RESULTS.md")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def benchmark_parser(doc: str, script: str, archs: list) -> argparse.ArgumentParser:
    """The options both benchmarks share; each adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=archs, default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--baseline", default=None,
                        help=f"a directory holding an older {script}: measured too, same settings, with a ratio row")
    parser.add_argument("--variant", action="append", default=[],
                        help="'NAME: --flag value ...': also measure the script with these flags (a lever's share)")
    parser.add_argument("--name", default="script-defaults", help="the layout name of the main row")
    parser.add_argument("--work_dir", default=None, help="where models and outputs go (default: a temp dir)")
    parser.add_argument("--profile_step", type=int, default=None,
                        help="also run each layout (not the baseline) once more, up to this step (2 or later), and "
                             "profile that step: operations ranked by GPU and CPU time in WORK_DIR/NAME.profile.txt, "
                             "their count in the row (whose timings come from the unprofiled run)")
    parser.add_argument("--profile_layouts", default=None,
                        help="with --profile_step: profile only these layouts (names, comma-separated); default all")
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser) -> tuple:
    """The benchmark's own options, the flags after `--` (they go to the script, in every run), and the variants
    as (name, flags) pairs."""
    argv = sys.argv[1:]
    own, script_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    if args.profile_step is not None and args.profile_step < 2:
        parser.error("--profile_step must be 2 or later: the first step warms up (and compiles)")
    variants = [(name.strip(), flags.split()) for name, _, flags in (v.partition(":") for v in args.variant)]
    if args.profile_layouts is not None:
        unknown = set(args.profile_layouts.split(",")) - {args.name} - {name for name, _ in variants}
        if args.profile_step is None or unknown:
            parser.error(f"--profile_layouts needs --profile_step and names of measured layouts (unknown: "
                         f"{', '.join(sorted(unknown)) or 'none'}; measured: {args.name}, "
                         f"{', '.join(name for name, _ in variants) or 'no variants'})")
    return args, script_flags, variants


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


def run_script(command: list[str], profile: str = "") -> dict:
    """Run `python <command>` from the repo root with every optimizer step timed (step_timer.py); return wall
    seconds, the child's peak RSS, the first step's seconds (warm-up, compilation), the mean seconds of the steps
    after it, and the first logged loss. `profile` ("STEP:PATH") also profiles that step into PATH."""
    import tempfile

    from step_timer import steady

    started = time.time()
    times = os.path.join(tempfile.mkdtemp(prefix="step_times_"), "steps.json")
    timer = os.path.join(REPO, "benchmarks", "step_timer.py")
    child = subprocess.Popen([sys.executable, timer, times, *command], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                                  "STEP_TIMER_PROFILE": profile})
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # resource usage of this child alone
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark run failed: python {' '.join(command)}\n{output[-4000:]}")
    steps = {"step_seconds": [], "first_loss": None}  # a script that trains nothing records no step
    if os.path.exists(times):
        with open(times) as handle:
            steps = json.load(handle)
    return {"wall_seconds": round(time.time() - started, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            **steady(steps["step_seconds"]), "first_loss": steps["first_loss"],
            "profiled_step_counts": steps.get("profiled_step_counts") or {}}


# Dense bf16 tensor-core peak by the vendors' datasheets (SXM parts), for model FLOPs utilisation. Measured on an
# H200 of the device machines this project used: about 790 TFLOP/s on an 8192^3 product, so 80% is the practical
# ceiling.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def mfu(flops_per_second: float) -> Optional[float]:
    """Model FLOPs utilisation on this machine's GPU, or None where its peak is not in the table (or no GPU)."""
    gpu = hardware()["gpu"] or ""
    peak = next((value for name, value in BF16_PEAK_FLOPS.items() if name in gpu), None)
    return round(flops_per_second / peak, 4) if peak else None


def fill_vocabulary(directory: str, vocab_size: int):
    """Give the tokenizer saved in `directory` `vocab_size` ids, as the real model's has. The benchmarks pair the
    tiny builders' tokenizers (a few hundred tokens; real vocabularies cannot be downloaded here) with models of real
    shape, and the scripts rightly refuse a tokenizer far smaller than its model's embedding table. The added
    tokens ("x1234") are in no merge rule, so text tokenizes as before; a sampled id decodes to a short word."""
    path = os.path.join(directory, "tokenizer.json")
    with open(path) as handle:
        data = json.load(handle)
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {token["id"] for token in data["added_tokens"]}
    for token_id in range(vocab_size):
        if token_id not in taken:
            name = f"x{token_id}"
            while name in vocab:
                name += "_"
            vocab[name] = token_id
    with open(path, "w") as handle:
        json.dump(data, handle, ensure_ascii=False)


def parameter_count(model_dir: str, classifier: bool = False) -> int:
    """Parameters of a saved model, counted from its config on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(config)
    return sum(p.numel() for p in model.parameters())


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


def measure_layouts(benchmark: str, args, layouts: list, measure_one, baseline: Optional[dict] = None,
                    compare=None) -> dict:
    """Measure each (name, flags) layout in order; with a baseline row, add each one's ratio row. A layout that
    fails gets a row saying why (the script's own paragraph, else its last line of output) and the others still
    run: a lever that breaks is a result too, and one failure must not cost a GPU session's other rows. Returns the
    rows measured, by name."""
    rows = {}
    for name, flags in layouts:
        try:
            row = measure_one(name, flags)
        except (SystemExit, Exception) as failed:  # a failed run (SystemExit), or a run that left no usable result
            output = str(failed).strip() or repr(failed)
            reason = output[output.rfind("error:"):] if "error:" in output else output.splitlines()[-1]
            print(f"{name} failed: {output}", flush=True)
            record(benchmark, {"arch": args.arch, "device": args.device, "layout": name, "flags": " ".join(flags)},
                   {"failed": " ".join(reason.split())[:300]})
            continue
        rows[name] = row
        if baseline is not None and compare is not None:
            compare(f"{name} vs baseline", row, baseline)
    return rows


def profile_layouts(benchmark: str, args, layouts: list, run_profiled) -> dict:
    """After every timed row: run each layout (or those --profile_layouts names) once more up to step
    --profile_step, profiled (timed runs never are: profiling slows the steps after it too), and record a row with
    that step's seconds (profiled), operation and GPU kernel launch counts and GPU busy seconds, and that run's first
    step (compile caches warm); its table goes to WORK_DIR/NAME.profile.txt. Layouts with the same flags are
    profiled once.
    `run_profiled(name, flags, profile)` runs the script with STEP_TIMER_PROFILE=`profile` and returns run_script's
    result."""
    seen, unique = set(), []
    chosen = args.profile_layouts.split(",") if args.profile_layouts else [name for name, _ in layouts]
    for name, flags in layouts:
        if name in chosen and tuple(flags) not in seen:
            seen.add(tuple(flags))
            unique.append((name, flags))

    def profile_one(label: str, flags: list) -> dict:
        name = label[: -len("-profile")]
        path = os.path.join(args.work_dir, f"{name}.profile.txt")
        if os.path.exists(path):
            os.remove(path)  # never a stale one from an earlier run
        run = run_profiled(name, flags, f"{args.profile_step}:{path}")
        counts, unit = dict(run["profiled_step_counts"]), "update" if benchmark == "ppo" else "step"
        figures = {f"profiled_{unit}_seconds": counts.pop("step_seconds", None),
                   **{f"{key}_per_{unit}": value for key, value in counts.items()},
                   # This run's first step, with the compile caches as the timed runs before it left them (warm).
                   f"first_{unit}_seconds_warm": run["first_step_seconds"]}
        return record(benchmark, {"arch": args.arch, "device": args.device, "layout": label,
                                  f"profiled_{unit}": args.profile_step}, figures)

    return measure_layouts(benchmark, args, [(f"{name}-profile", flags) for name, flags in unique], profile_one)
