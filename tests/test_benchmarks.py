"""Benchmarks: one JSON line per measurement and a row appended to RESULTS.md."""
import json
import os
import sys

from conftest import REPO

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


def test_run_script_measures_wall_time_and_peak_memory_of_the_child():
    measured = common.run_script(["-c", "x = bytearray(300 * 2**20); import time; time.sleep(0.2)"])
    assert measured["wall_seconds"] >= 0.2 and 0.29 <= measured["peak_rss_gib"] < 2


def run_benchmark(module_name: str, argv: list, tmp_path, monkeypatch, capsys) -> list:
    """Run a benchmark's main() as from the command line; return its JSON lines (rows go to a temp RESULTS.md)."""
    import importlib

    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "RESULTS.md"))
    monkeypatch.setattr(sys, "argv", [module_name, *argv])
    importlib.import_module(module_name).main()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_ppo_benchmark_times_both_phases_and_compares_with_trl_example_layout(ppo_assets, tmp_path, monkeypatch,
                                                                              capsys):
    os.symlink(ppo_assets, tmp_path / "tiny")  # the tiny models, already built
    ours, theirs, comparison = run_benchmark(
        "bench_ppo", ["--updates", "3", "--compare_trl_example", "--work_dir", str(tmp_path), "--",
                      "--num_eval_prompts", "8"], tmp_path, monkeypatch, capsys)
    assert ours["settings"]["batch_size"] == 32 and ours["settings"]["num_mini_batches"] == 2
    assert theirs["settings"]["batch_size"] == 64 and theirs["settings"]["micro_batch"] == 64
    assert theirs["settings"]["num_mini_batches"] == 1 and theirs["settings"]["updates"] == 3
    for row in (ours, theirs):
        figures = row["figures"]
        assert 0 < figures["rollout_seconds_per_update"] + figures["optimisation_seconds_per_update"]
        assert figures["samples_per_second"] > 0 and figures["peak_rss_gib"] > 0.1
    ratio = ours["figures"]["samples_per_second"] / theirs["figures"]["samples_per_second"]
    assert comparison["figures"]["samples_per_second_ratio"] == round(ratio, 2)
    assert (tmp_path / "RESULTS.md").read_text().count("| ppo |") == 3


def test_dpo_benchmark_records_seconds_per_step(dpo_assets, tmp_path, monkeypatch, capsys):
    os.symlink(dpo_assets, tmp_path / "tiny")
    (row,) = run_benchmark("bench_dpo", ["--steps", "3", "--work_dir", str(tmp_path)], tmp_path, monkeypatch, capsys)
    assert row["settings"]["steps"] == 3 and row["settings"]["load_in_4bit"] is True
    assert row["figures"]["seconds_per_step"] > 0 and row["figures"]["wall_seconds"] > 0
    assert "| dpo |" in (tmp_path / "RESULTS.md").read_text()
