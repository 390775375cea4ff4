"""Benchmarks: one JSON line per measurement and a row appended to RESULTS.md."""
import json
import os
import re
import sys

import pytest
from helpers import REPO, tiny_argv

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
    flags = [flag for flag in bench_ppo.TRL_EXAMPLE_FLAGS if flag != "--trl_memory_freeing"]  # measured_ppo.py's
    theirs = ppo.parse_args(flags + ["--output_dir", str(tmp_path / "run")])
    ppo.validate(theirs)
    assert not (theirs.static_cache_generation or theirs.compile_ppo_epochs or theirs.bf16_autocast or theirs.tf32)
    assert "--trl_memory_freeing" in bench_ppo.TRL_EXAMPLE_FLAGS


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
    monkeypatch.setattr(sys, "argv", ["bench", "--profile_step", "3", "--profile_layouts", "slow", "--variant",
                                      "slow: -x"])
    assert common.parse_benchmark_args(parser)[0].profile_layouts == "slow"


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
def test_measured_ppo_records_each_updates_phases_and_the_first_epochs_policy_ratio(ppo_assets, tmp_path):
    """What the user's run no longer measures, the wrapper does, beside the run's own eval.json: both phases of
    each update (parts of the training time), their means after the first update, and the first PPO epoch's policy
    ratio, which in fp32 stays 1 (measured 0.0 to 6 places on 2 CPU cores). The script's trainer is put back."""
    import measured_ppo
    import ppo_gpt2_imdb as ppo

    trainer_class = ppo.SentimentPPOTrainer
    measured = measured_ppo.main(tiny_argv(ppo_assets, tmp_path, "--total_episodes", "96", "--num_eval_prompts", 8))
    assert ppo.SentimentPPOTrainer is trainer_class
    assert json.loads((tmp_path / "benchmark.json").read_text()) == measured
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["updates"] == 3 and not {"policy_ratio_error", "rollout_seconds_per_update"} & set(result)
    rollout, optimisation = measured["rollout_seconds"], measured["optimisation_seconds"]
    assert len(rollout) == len(optimisation) == 3 and min(rollout + optimisation) > 0
    assert sum(rollout + optimisation) <= result["train_seconds"] + 0.01  # parts of training (train_seconds: 2 places)
    assert measured["first_rollout_seconds"] == rollout[0]
    assert measured["optimisation_seconds_per_update"] == round(sum(optimisation[1:]) / 2, 4)
    assert measured["policy_ratio_error"] < 1e-4 and measured["cuda_graph_skips"] == 0


@pytest.mark.slow
def test_ppo_benchmark_times_both_phases_and_compares_with_a_baseline(ppo_assets, tmp_path, monkeypatch, capsys):
    """Every run goes through measured_ppo.py, whose benchmark.json gives the phases and the ratio error. The
    baseline here is the script itself (copied, run as another copy): the point is the bookkeeping. A variant
    that fails gets a row saying why, and the rest still runs. Checked without a child process of their own, to
    keep the suite short: profiling (test_profile_layouts_profiles_the_named_layouts_each_once) and the TRL-example
    layout's flags (test_trl_example_layout_turns_off_every_gpu_lever_of_the_script_defaults); its comparison row
    is the same code as the baseline's."""
    import shutil

    os.symlink(ppo_assets, tmp_path / "tiny")  # the tiny models, already built
    shutil.copy(os.path.join(REPO, "ppo_gpt2_imdb.py"), tmp_path / "ppo_gpt2_imdb.py")
    rows = run_benchmark(
        "bench_ppo", ["--updates", "3", "--baseline", str(tmp_path), "--work_dir",
                      str(tmp_path), "--variant",
                      "broken: --compile_ppo_epochs fast", "--", "--num_eval_prompts", "8"], tmp_path, monkeypatch,
        capsys)
    names = [row["settings"].get("layout", row["settings"].get("comparison")) for row in rows]
    assert names == ["baseline", "script-defaults", "script-defaults vs baseline", "broken"]
    old, ours, versus, broken = rows
    assert "--compile_ppo_epochs" in broken["figures"]["failed"]
    assert ours["settings"]["updates"] == 3
    assert old["settings"]["layout"] == "baseline" and ours["settings"]["layout"] == "script-defaults"
    assert ours["settings"]["batch_size"] == 32 and ours["settings"]["num_mini_batches"] == 2
    for lever in ("compile_ppo_epochs", "static_cache_generation", "bf16_autocast"):
        assert ours["settings"][lever] is False  # on a GPU only
    for row in (old, ours):
        figures = row["figures"]
        steady = figures["steady_seconds_per_update"]
        # The phases are parts of an update: together they cannot take longer than the update measured around them.
        assert 0 < figures["rollout_seconds_per_update"] + figures["optimisation_seconds_per_update"] <= steady * 1.05
        first = figures["first_rollout_seconds"] + figures["first_optimisation_seconds"]
        assert 0 < first <= figures["first_update_seconds"] * 1.05  # parts of the first update, as above
        assert figures["samples_per_second"] == round(row["settings"]["batch_size"] / steady, 2)
        passes = 195 * 128 / row["settings"]["batch_size"] - 1
        assert figures["full_pass_seconds"] == round(figures["first_update_seconds"] + passes * steady, 1)
        assert figures["policy_ratio_error"] < 1e-4 and figures["cuda_graph_skips"] == 0  # from measured_ppo.py
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
    out there): one group per call (ppo or dpo), a baseline copy that exists, parts that cannot finish before
    DEADLINE skipped rather than cut off, each part's rows summarised."""
    import subprocess

    import dpo_llama2_stackexchange as dpo
    import ppo_gpt2_imdb as ppo

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB'\n")
    calls = tmp_path / "calls.tsv"  # each benchmark command, its arguments tab-separated
    (stubs / "python3").write_text(f'#!/bin/sh\n[ "$1" = "-c" ] && exec {sys.executable} "$@"\n'
                                   f'printf "%s\\t" "$@" >> {calls}; echo >> {calls}\n'
                                   'echo \'{"benchmark": "dpo", "settings": {"layout": "stub"}, '
                                   '"figures": {"s": 1}}\'\n')
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
    assert "== dpo_spread_lengths: exit 0" in session(str(baseline), "dpo").stdout  # in time now
    ppo_run = session(str(baseline), "ppo")
    assert ppo_run.returncode == 0 and "== ppo: exit 0" in ppo_run.stdout
    # Every variant's flags parse as its script's settings (a misspelt or removed one would cost a GPU session its
    # row); the PPO group also measures TRL's example layout.
    commands = [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()]
    variants = {}
    for command in commands:
        script = ppo if "benchmarks/bench_ppo.py" in command else dpo
        for option, variant in zip(command, command[1:]):
            if option == "--variant":
                name, _, flags = variant.partition(":")
                variants[name] = script.parse_args(flags.split())
    assert sorted(variants) == ["eager-fp32", "no-liger"], variants
    eager = variants["eager-fp32"]
    assert not (eager.static_cache_generation or eager.compile_ppo_epochs or eager.bf16_autocast)
    assert not variants["no-liger"].use_liger_kernel
    assert any("--compare_trl_example" in command for command in commands if "benchmarks/bench_ppo.py" in command)
