"""Benchmarks: one JSON line per measurement and a row appended to RESULTS.md."""
import json
import os
import re
import sys

import pytest
from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import common  # noqa: E402


def test_record_prints_one_json_line_and_appends_a_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "RESULTS.md"))
    common.record("ppo", {"arch": "tiny", "batch_size": 32}, {"seconds_per_update": 0.66})
    common.record("dpo", {"arch": "tiny"}, {"seconds_per_step": 0.15})
    lines = capsys.readouterr().out.strip().splitlines()
    first = json.loads(lines[0])
    assert first["settings"]["batch_size"] == 32 and first["figures"]["seconds_per_update"] == 0.66
    assert first["versions"]["trl"] == "1.12.0" and first["hardware"]["cores"] == os.cpu_count()
    rows = [line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2 and "seconds_per_update=0.66" in rows[0] and "| dpo |" in rows[1]


def test_trl_example_layout_turns_off_every_gpu_lever_of_the_script_defaults(tmp_path, monkeypatch):
    """--compare_trl_example measures TRL's own one-GPU layout: on a GPU, where the script's defaults decode into a
    static cache, compile the PPO epochs and run them under bf16 autocast, none of that may leak into it."""
    import bench_ppo
    import ppo_gpt2_imdb as ppo

    monkeypatch.setattr(ppo, "on_gpu", lambda args: True)
    defaults = ppo.parse_args([])
    assert defaults.static_cache_generation and defaults.compile_ppo_epochs and defaults.bf16_autocast
    theirs = ppo.parse_args(bench_ppo.TRL_EXAMPLE_FLAGS + ["--output_dir", str(tmp_path / "run")])
    ppo.validate(theirs)
    assert not (theirs.static_cache_generation or theirs.compile_ppo_epochs or theirs.bf16_autocast or theirs.tf32)
    assert theirs.free_memory_each_update and theirs.logprob_chunk_mib == 0


def test_step_timer_profiles_one_step_and_records_which_steps_it_cost(tmp_path):
    """The profiled step's operations are counted (here two randn and one matmul per step: the operations they
    call inside are not); a run that ends before the asked step says so in the profile file."""
    import torch
    from step_timer import StepTimer

    def drive(steps: int, profile: str) -> dict:
        timer = StepTimer(str(tmp_path / "steps.json"), profile)
        timer.on_train_begin(None, None, None)
        for _ in range(steps):
            torch.randn(64, 64) @ torch.randn(64, 64)
            timer.on_step_end(None, None, None)
        timer.on_train_end(None, None, None)
        return json.loads((tmp_path / "steps.json").read_text())

    recorded = drive(5, f"2:{tmp_path / 'profile.txt'}")
    assert len(recorded["step_seconds"]) == 5
    counts = recorded["profiled_step_counts"]
    assert counts == {"operations": 3, "kernel_launches": None, "gpu_kernels": None, "gpu_busy_seconds": None,
                      "step_seconds": recorded["step_seconds"][1]}  # no GPU here
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.startswith("Step 2: ") and "; 3 PyTorch operations." in profile and "aten::mm" in profile
    assert drive(2, f"4:{tmp_path / 'late.txt'}")["profiled_step_counts"] == {}
    assert (tmp_path / "late.txt").read_text().startswith("No profile: training ended after 2 steps, before step 4")


def test_gpu_busy_time_counts_overlapping_kernels_once():
    """Kernels on two streams that overlap are busy time once; gaps between kernels (the GPU waiting for the host)
    are not busy time."""
    from step_timer import busy_microseconds

    assert busy_microseconds([]) == 0
    assert busy_microseconds([(0, 10), (20, 30)]) == 20  # a gap of 10 between them
    assert busy_microseconds([(20, 30), (0, 10), (5, 12), (6, 8)]) == 22  # (0, 12) and (20, 30), in any order
    assert busy_microseconds([(0, 100), (10, 20), (30, 40)]) == 100  # nested in a long one


def test_a_gpu_profile_counts_launches_kernels_and_busy_seconds_as_the_union_of_kernel_spans():
    """The GPU side of count_events, on a profile faked here (no GPU): busy seconds are the union of the kernels'
    microsecond spans, launches are the runtime's launch calls, and operations nested in an aten operation are not
    counted again."""
    from types import SimpleNamespace

    from step_timer import count_events
    from torch.autograd import DeviceType

    def event(name, device, start=0, end=0, parent=None):
        return SimpleNamespace(name=name, device_type=device, cpu_parent=parent,
                               time_range=SimpleNamespace(start=start, end=end))

    mm = event("aten::mm", DeviceType.CPU)
    events = [mm, event("aten::t", DeviceType.CPU, parent=mm), event("cudaLaunchKernel", DeviceType.CPU),
              event("cudaGraphLaunch", DeviceType.CPU), event("gemm", DeviceType.CUDA, 0, 300_000),
              event("add", DeviceType.CUDA, 100_000, 500_000), event("copy", DeviceType.CUDA, 900_000, 1_000_000)]
    assert count_events(SimpleNamespace(events=lambda: events)) == {
        "operations": 1, "kernel_launches": 2, "gpu_kernels": 3, "gpu_busy_seconds": 0.6}


def test_profile_layouts_profiles_the_named_layouts_each_once(tmp_path, monkeypatch, capsys):
    """--profile_layouts limits the profiled runs to the layouts named (a GPU session cannot afford a profiled run
    of each); a named layout whose flags another named one has is profiled once. Each profile row carries the
    profiled step's seconds, the counts and that run's first step (its compile caches warm from the timed runs). A
    profiled run that fails gets a row saying why (the script's paragraph), and the layouts after it are still
    profiled."""
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "RESULTS.md"))
    args = type("Args", (), {"arch": "gpt2", "device": "cuda", "work_dir": str(tmp_path), "profile_step": 3,
                             "profile_layouts": "b,e,c,d"})()
    runs = []

    def run_profiled(name, flags, profile):
        runs.append((name, profile))
        if name == "e":  # as run_script stops when the child fails
            sys.exit("benchmark run failed: python x.py --z\nerror: --compile_ppo_epochs must be one\nof")
        return {"first_step_seconds": 9.5, "profiled_step_counts": {
            "operations": 100, "kernel_launches": 40, "gpu_kernels": 60, "gpu_busy_seconds": 0.1, "step_seconds": 0.4}}

    layouts = [("a", ["--x"]), ("b", ["--y"]), ("e", ["--z"]), ("c", ["--x"]), ("d", ["--y"])]
    rows = common.profile_layouts("ppo", args, layouts, run_profiled)
    assert [name for name, _ in runs] == ["b", "e", "c"] and runs[0][1] == f"3:{tmp_path / 'b.profile.txt'}"
    assert list(rows) == ["b-profile", "c-profile"]
    recorded = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [row["settings"]["layout"] for row in recorded] == ["b-profile", "e-profile", "c-profile"]
    assert recorded[1]["figures"] == {"failed": "error: --compile_ppo_epochs must be one of"}
    assert rows["b-profile"]["figures"] == {
        "profiled_update_seconds": 0.4, "operations_per_update": 100, "kernel_launches_per_update": 40,
        "gpu_kernels_per_update": 60, "gpu_busy_seconds_per_update": 0.1, "first_update_seconds_warm": 9.5}


def test_profile_layouts_must_name_measured_layouts(monkeypatch, capsys):
    parser = common.benchmark_parser("", "ppo_gpt2_imdb.py", ["tiny"])
    for argv, says in ((["--profile_layouts", "script-defaults"], "needs --profile_step"),
                       (["--profile_step", "3", "--profile_layouts", "fast,script-defaults", "--variant", "slow: -x"],
                        "(unknown: fast; measured: script-defaults, slow)")):
        monkeypatch.setattr(sys, "argv", ["bench", *argv])
        with pytest.raises(SystemExit):
            common.parse_benchmark_args(parser)
        assert says in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["bench", "--profile_step", "3", "--profile_layouts", "slow", "--variant", "slow: -x"])
    assert common.parse_benchmark_args(parser)[0].profile_layouts == "slow"


def test_compile_decode_on_cpu_makes_transformers_compile_static_cache_calls_as_on_a_gpu(tmp_path):
    """bench_ppo --compile_decode_on_cpu: the child run then compiles the decode of exactly the `generate` calls
    that have a static cache, as transformers does on a GPU; without it, a CPU compiles none (so the profiles of
    static-cache layouts on a CPU would count eager decoding)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        "from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, GenerationConfig, StaticCache\n"
        "model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))\n"
        "static = StaticCache(config=model.config, max_cache_len=8)\n"
        "decide = lambda cache: model._valid_auto_compile_criteria({'cache': cache}, GenerationConfig())\n"
        "open(sys.argv[1], 'w').write(' '.join(str(decide(c)) for c in (static, DynamicCache(), None)))\n")
    for compiled, expected in ((True, "True False False"), (False, "False False False")):
        common.run_script([str(probe), str(tmp_path / "decisions.txt")], compile_decode_on_cpu=compiled)
        assert (tmp_path / "decisions.txt").read_text() == expected


def test_dpo_tokens_per_second_counts_the_timed_steps_own_tokens():
    """The steady time covers steps 2..N, so the real tokens are those of steps 2..N, from the run's cumulative
    count; a log without counts (an older copy of the script) gives None, and the pairs' mean is used instead."""
    import bench_dpo

    log = [{"step": 1, "loss": 0.69, "num_tokens": 900.0}, {"step": 2, "num_tokens": 1500.0},
           {"step": 3, "num_tokens": 1800.0}, {"step": 4, "num_tokens": 2700.0}]
    assert bench_dpo.steady_tokens_per_step(log) == (2700 - 900) / 3
    assert bench_dpo.steady_tokens_per_step([{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}]) is None
    assert bench_dpo.steady_tokens_per_step(log[1:]) is None  # the first step's count is needed to leave it out


def test_a_failing_layout_gets_a_row_saying_why_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "RESULTS.md"))
    args = type("Args", (), {"arch": "tiny", "device": "cpu"})()
    failures = {"exits": SystemExit("benchmark run failed: python x.py\nerror: --compile_ppo_epochs must be one\nof"),
                "no-result": FileNotFoundError("eval.json"), "silent": SystemExit("")}

    def measure_one(name, flags):
        if name in failures:
            raise failures[name]
        return {"figures": {"seconds": 1.0}}

    compared = []
    rows = common.measure_layouts("ppo", args, [(name, ["--x"]) for name in [*failures, "works"]], measure_one,
                                  {"figures": {"seconds": 2.0}}, lambda name, new, old: compared.append(name))
    assert rows == {"works": {"figures": {"seconds": 1.0}}} and compared == ["works vs baseline"]
    failed = {row["settings"]["layout"]: row["figures"]["failed"] for row in map(
        json.loads, (line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))}
    assert failed == {"exits": "error: --compile_ppo_epochs must be one of", "no-result": "eval.json",
                      "silent": "SystemExit('')"}


@pytest.mark.slow
def test_run_script_measures_wall_time_and_peak_memory_of_the_child(tmp_path):
    script = tmp_path / "allocate.py"
    script.write_text("x = bytearray(300 * 2**20); import time; time.sleep(0.2)\n")
    measured = common.run_script([str(script)])
    assert measured["wall_seconds"] >= 0.2 and 0.29 <= measured["peak_rss_gib"] < 2
    assert measured["first_step_seconds"] is None  # it trains nothing


def run_benchmark(module_name: str, argv: list, tmp_path, monkeypatch, capsys) -> list:
    """Run a benchmark's main() as from the command line; return its JSON lines (rows go to a temp RESULTS.md)."""
    import importlib

    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "RESULTS.md"))
    monkeypatch.setattr(sys, "argv", [module_name, *argv])
    importlib.import_module(module_name).main()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_ppo_benchmark_times_both_phases_and_compares_with_a_baseline_and_trl_example_layout(
        ppo_assets, tmp_path, monkeypatch, capsys):
    """The baseline here is the script itself (copied): the point is the bookkeeping, not a speed-up. A variant
    that fails gets a row saying why, and the rest still runs. --profile_step profiles update 2 after every timed
    row, in runs of their own (timed runs are never profiled), each with a row of its counts; --profile_layouts
    picks which (here not the failing variant: that a failed profiled run gets its row, and that layouts with the
    same flags are profiled once, test_profile_layouts_profiles_the_named_layouts_each_once shows without paying
    a child process for each)."""
    import shutil

    os.symlink(ppo_assets, tmp_path / "tiny")  # the tiny models, already built
    shutil.copy(os.path.join(REPO, "ppo_gpt2_imdb.py"), tmp_path / "ppo_gpt2_imdb.py")
    rows = run_benchmark(
        "bench_ppo", ["--updates", "3", "--compare_trl_example", "--baseline", str(tmp_path), "--work_dir",
                      str(tmp_path), "--profile_step", "2", "--profile_layouts", "script-defaults", "--variant",
                      "broken: --compile_ppo_epochs fast", "--", "--num_eval_prompts", "8"], tmp_path, monkeypatch,
        capsys)
    names = [row["settings"].get("layout", row["settings"].get("comparison")) for row in rows]
    assert names == ["baseline", "script-defaults", "script-defaults vs baseline", "broken", "trl-example",
                     "script-defaults vs trl-example", "script-defaults-profile"]
    old, ours, versus, broken, theirs, comparison, profiled = rows
    assert "must be one of" in broken["figures"]["failed"]
    assert profiled["settings"]["profiled_update"] == 2 and profiled["figures"]["operations_per_update"] > 1000
    assert profiled["figures"]["kernel_launches_per_update"] is None  # no GPU here
    assert profiled["figures"]["gpu_busy_seconds_per_update"] is None
    assert profiled["figures"]["profiled_update_seconds"] > 0 and profiled["figures"]["first_update_seconds_warm"] > 0
    profile = (tmp_path / "script-defaults.profile.txt").read_text()
    assert profile.startswith("Step 2: ") and "By CPU time" in profile and "aten::" in profile
    assert ours["settings"]["updates"] == 3 and json.loads((tmp_path / "script-defaults-profiled" / "eval.json")
                                                            .read_text())["updates"] == 2
    assert old["settings"]["layout"] == "baseline" and ours["settings"]["layout"] == "script-defaults"
    assert ours["settings"]["batch_size"] == 32 and ours["settings"]["num_mini_batches"] == 2
    assert ours["settings"]["compile_ppo_epochs"] is None and ours["settings"]["compile_scope"] is None  # eager
    assert ours["settings"]["compile_decode"] is None  # no static cache: nothing to compile
    assert theirs["settings"]["batch_size"] == 64 and theirs["settings"]["micro_batch"] == 64
    assert theirs["settings"]["num_mini_batches"] == 1 and theirs["settings"]["updates"] == 3
    for row in (old, ours, theirs):
        figures = row["figures"]
        steady = figures["steady_seconds_per_update"]
        # The phases are parts of an update: together they cannot take longer than the update measured around them.
        assert 0 < figures["rollout_seconds_per_update"] + figures["optimisation_seconds_per_update"] <= steady * 1.05
        first = figures["first_rollout_seconds"] + figures["first_optimisation_seconds"]
        assert 0 < first <= figures["first_update_seconds"] * 1.05  # parts of the first update, as above
        assert figures["samples_per_second"] == round(row["settings"]["batch_size"] / steady, 2)
        passes = 195 * 128 / row["settings"]["batch_size"] - 1
        assert figures["full_pass_seconds"] == round(figures["first_update_seconds"] + passes * steady, 1)
    ratio = ours["figures"]["samples_per_second"] / theirs["figures"]["samples_per_second"]
    assert comparison["figures"]["samples_per_second_ratio"] == round(ratio, 2)
    ratio = ours["figures"]["samples_per_second"] / old["figures"]["samples_per_second"]
    assert versus["figures"]["samples_per_second_ratio"] == round(ratio, 2)
    assert (tmp_path / "RESULTS.md").read_text().count("| ppo |") == len(rows)


@pytest.mark.slow
def test_dpo_benchmark_times_steps_after_the_first_and_reads_the_first_loss(dpo_assets, tmp_path, monkeypatch,
                                                                            capsys):
    """The step timer (step_timer.py, wrapped around the script in its own process) records one interval per DPO
    optimizer step and the first logged loss, which is ln 2 at step 1 (policy = reference)."""
    import math

    import step_timer

    timed = []  # what the benchmark read from the step timer's file: the seconds of each step
    monkeypatch.setattr(step_timer, "steady", lambda seconds, real=step_timer.steady: timed.append(seconds) or
                        real(seconds))
    os.symlink(dpo_assets, tmp_path / "tiny")
    (row,) = run_benchmark("bench_dpo", ["--steps", "3", "--work_dir", str(tmp_path)], tmp_path, monkeypatch, capsys)
    assert row["settings"]["steps"] == 3 and row["settings"]["load_in_4bit"] is True
    assert len(timed) == 1 and len(timed[0]) == 3 and all(seconds > 0 for seconds in timed[0])
    assert abs(row["figures"]["first_loss"] - math.log(2)) < 1e-4
    assert 0 < row["figures"]["steady_seconds_per_step"] < row["figures"]["wall_seconds"]
    assert "| dpo |" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_shape_faithful_ppo_models_pass_the_scripts_own_loading_checks(ppo_assets, tmp_path):
    """The GPU benchmark's GPT-2 and DistilBERT of real shape get the tiny tokenizers filled up to their real
    vocabularies (50257, 30522): the script's check refused the bare tiny ones (591 tokens for 50257 embeddings)
    before any update ran. Filling changes no tokenization; a filler id decodes to a short word."""
    from transformers import AutoTokenizer

    import bench_ppo
    import ppo_gpt2_imdb as ppo

    os.symlink(ppo_assets, tmp_path / "tiny")
    bench_ppo.build_shape_faithful_models(str(tmp_path))
    args = ppo.parse_args(["--model_name_or_path", str(tmp_path / "gpt2"), "--reward_model_name_or_path",
                           str(tmp_path / "distilbert"), "--device", "cpu"])
    policy_tokenizer = ppo.load_policy_tokenizer(args)
    reward = ppo.load_reward_model(args, policy_tokenizer)
    assert len(reward.backbone.classifier_tokenizer) == 30522 and len(policy_tokenizer) >= 50257
    tiny = AutoTokenizer.from_pretrained(tmp_path / "tiny" / "gpt2")
    text = "The acting was superb, even moving."
    assert policy_tokenizer(text)["input_ids"] == tiny(text)["input_ids"]
    assert policy_tokenizer.decode([50000]).strip() == "x50000"
    assert reward.backbone.score_token_rows([[50000, 1000]]).shape == (1,)


@pytest.mark.slow
def test_shape_faithful_llama_passes_the_dpo_scripts_own_loading_checks(dpo_assets, tmp_path):
    """The same for the DPO benchmark's Llama-2-7B shape (one layer here; 32000 ids)."""
    import bench_dpo
    import dpo_llama2_stackexchange as dpo

    os.symlink(dpo_assets, tmp_path / "tiny")
    bench_dpo.build_shape_faithful_model(str(tmp_path), 1, "cpu", 64, "full")
    tokenizer = dpo.load_checked_tokenizer(str(tmp_path / "llama2-7b"), "model_name_or_path")
    assert len(tokenizer) == 32000
    assert tokenizer.decode([31000]).strip() == "x31000"


def test_gpu_session_refuses_a_missing_group_or_baseline_and_skips_parts_past_its_deadline(tmp_path):
    """Checked here with stand-ins for nvidia-smi and the benchmarks (a GPU session is too scarce to find these
    out there): one group per call, a baseline copy that exists, parts that cannot finish before DEADLINE skipped
    rather than cut off, each part's rows summarised."""
    import dataclasses
    import subprocess

    import dpo_llama2_stackexchange as dpo
    import ppo_gpt2_imdb as ppo

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB'\n")
    calls = tmp_path / "calls.tsv"  # each benchmark command, its arguments tab-separated
    (stubs / "python3").write_text(f'#!/bin/sh\n[ "$1" = "-c" ] && exec {sys.executable} "$@"\n'
                                   f'printf "%s\\t" "$@" >> {calls}; echo >> {calls}\n'
                                   'echo \'{"benchmark": "dpo", "settings": {"layout": "stub"}, "figures": {"s": 1}}\'\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    baseline = tmp_path / "old"
    baseline.mkdir()

    def session(*argv, deadline="570"):
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
               "DEADLINE": deadline}
        return subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_session.sh"), *argv], cwd=REPO,
                              capture_output=True, text=True, env=env, timeout=60)

    assert session(str(baseline)).returncode == 2  # no group
    missing = session(str(baseline), "dpo")
    assert missing.returncode == 2 and "holds no copy of the scripts" in missing.stdout
    for script in ("ppo_gpt2_imdb.py", "dpo_llama2_stackexchange.py"):
        (baseline / script).write_text("")
    ran = session(str(baseline), "dpo", deadline="200")
    # 200 s left, less the seconds the stand-ins took on a busy machine
    assert re.search(r"== dpo_spread_lengths: skipped \(needs up to 260 s, (200|19\d) s left\)", ran.stdout), ran.stdout
    assert "== dpo: exit 0" in ran.stdout and "== dpo_batch1: exit 0" in ran.stdout and "stub {'s': 1}" in ran.stdout
    assert (tmp_path / "out" / "RESULTS.md").exists() and (tmp_path / "out" / "profiles.txt").exists()
    compiled = session(str(baseline), "compile")
    for part in ("compile_cudagraphs_backend", "compile"):
        assert f"== {part}: exit 0" in compiled.stdout
    logprobs = session(str(baseline), "logprobs")
    for part in ("logprobs_eager", "logprobs_defaults"):
        assert f"== {part}: exit 0" in logprobs.stdout
    assert session(str(baseline), "ppo").returncode == 0
    # Every setting a variant names is one of the script's (a misspelt one would cost a GPU session its row).
    commands = [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()]
    variants = [flags for command in commands for option, flags in zip(command, command[1:]) if option == "--variant"]
    assert any("static-cache-cudagraphs-backend" in variant for variant in variants), variants
    settings = {flag[2:] for variant in variants for flag in variant.partition(":")[2].split() if flag.startswith("--")}
    # The logprobs group: chunks, TRL's, chunks again, once in the eager fp32 layout (its flags after --) and once
    # at the defaults (nothing after --).
    logprob_runs = [command for command in commands if "chunks-again:" in command]
    assert len(logprob_runs) == 2 and all("trl-logprobs: --logprob_chunk_mib 0" in run for run in logprob_runs)
    assert [run[run.index("--") + 1:] if "--" in run else [] for run in logprob_runs] == [
        ["--static_cache_generation", "false", "--compile_ppo_epochs", "none", "--bf16_autocast", "false"], []]
    ppo_settings, dpo_settings = ({field.name for field in dataclasses.fields(module.Args)} for module in (ppo, dpo))
    assert settings and settings <= ppo_settings | dpo_settings, settings - ppo_settings - dpo_settings


@pytest.mark.slow
def test_compile_benchmark_compiles_each_scope_cold_in_its_own_process(tmp_path, monkeypatch, capsys):
    """One row per scope, each from a child with empty inductor and Triton caches; the regional scope's gradients,
    on its third step, match eager ones (measured on 2 CPU cores, 2-layer model, batch 4, cold caches: first step
    17.2 s compiled whole, 11.4 s per block, each one graph). The whole scope is what --compile_ppo_epochs does,
    tested with the script."""
    rows = run_benchmark("bench_compile", ["--arch", "tiny", "--scopes", "blocks,eager", "--batch_size", "4",
                                           "--steps", "1"], tmp_path, monkeypatch, capsys)
    assert [row["settings"]["scope"] for row in rows] == ["blocks", "eager"]
    blocks, eager = (row["figures"] for row in rows)
    assert blocks["compiled_blocks"] == 4 and (blocks["graphs"], blocks["graph_breaks"]) == (1, 0)
    assert eager["graphs"] == 0
    assert blocks["largest_relative_gradient_difference"] < 1e-4
    assert blocks["cuda_graphs_recorded"] is None and blocks["cuda_graph_skips"] == 0  # no GPU here
    assert all(figures["first_step_seconds"] > 0 and figures["steady_seconds_per_step"] > 0
               for figures in (blocks, eager))
    assert "| compile |" in (tmp_path / "RESULTS.md").read_text()
