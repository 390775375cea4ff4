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
