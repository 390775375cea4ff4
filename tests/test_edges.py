"""Edges of both scripts: a disk that fills while saving, and signals and failures on several processes. The
end-to-end disk tests run the scripts on a real tmpfs that fills (in a mount namespace of the test's own); the
in-process ones raise the errors a full disk raises from a patched writer. Ctrl-C on two processes, end to end,
is in each script's two-process test (test_ppo.py, test_dpo.py)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import dpo_llama2_stackexchange as dpo
import ppo_gpt2_imdb as ppo
from helpers import DPO_SCRIPT, PPO_SCRIPT, REPO, child_env, free_port, on_a_small_disk, tiny_argv

FULL = "No space left on device"


# ---------------------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("module", [ppo, dpo], ids=["ppo", "dpo"])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, FULL),  # Python's own writes: json, tokenizer files
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 5")],
                         ids=["OSError", "torch zip writer"])  # torch.save's, as measured on a full tmpfs
def test_a_write_that_fails_while_saving_is_one_paragraph_and_leaves_no_half_written_file(module, error, tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "weights.bin").write_text("an earlier checkpoint")

    def save(staging):
        os.makedirs(os.path.join(staging, "checkpoint-4"))
        with open(os.path.join(staging, "checkpoint-4", "weights.bin"), "w") as handle:
            handle.write("half of it")
        raise error

    message = " ".join(str(pytest.raises(SystemExit, module.save_atomically, str(tmp_path), save,
                                         "checkpoint-4").value).split())
    assert f"Could not save checkpoint-4 in '{tmp_path}': {type(error).__name__}: {str(error)[:30]}" in message
    assert " MiB free there). The half-written files are removed; what was saved before is kept (checkpoints up to " \
           "checkpoint-2). Free some space, then continue with:" in message and "The disk is full (" in message
    assert message.endswith(f"--resume {tmp_path}/checkpoint-2") and "Traceback" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no .saving, no checkpoint-4
    assert (tmp_path / "checkpoint-2" / "weights.bin").read_text() == "an earlier checkpoint"


def test_an_error_that_is_not_a_write_error_is_not_explained_as_one(tmp_path):
    """A bug is not a full disk: it propagates, and what was half saved stays in .saving (never looking complete)."""
    def save(staging):
        raise RuntimeError("a shape mismatch")

    with pytest.raises(RuntimeError, match="a shape mismatch"):
        ppo.save_atomically(str(tmp_path), save, "checkpoint-1")
    assert [p.name for p in tmp_path.iterdir()] == [".saving"]


def written_files(directory) -> list:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow
def test_ppo_on_a_disk_that_fills_at_a_checkpoint_says_so_and_the_printed_command_continues(ppo_assets, tmp_path):
    """A 5 MiB tmpfs holds checkpoint-2 (3.4 MiB) but not checkpoint-4 beside it. The run stops with one
    paragraph, no traceback, exit 1; checkpoint-2 is intact and nothing of checkpoint-4 is left. With space again
    (the same files on the real disk), the printed command, run verbatim by a shell, finishes the run, its progress
    bar counting the whole run's updates."""
    out = tmp_path / "run"
    argv = tiny_argv(ppo_assets, out, "--total_episodes", "192", "--save_steps", "2", "--num_eval_prompts", "8")
    failed = on_a_small_disk(PPO_SCRIPT, argv, out, kib=5120)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and failed.stderr.count("error: Could not save") == 1
    message = " ".join(failed.stderr.split())
    assert f"Could not save checkpoint-4 in '{out}': RuntimeError: " in message and "The disk is full (" in message
    assert "(checkpoints up to checkpoint-2). Free some space, then continue with:" in message
    assert written_files(out) == ["checkpoint-2/counters.json", "checkpoint-2/custom_checkpoint_0.pkl",
                                  "checkpoint-2/optimizer.bin", "checkpoint-2/pytorch_model.bin",
                                  "checkpoint-2/random_states_0.pkl", "settings.json"]
    command = failed.stderr.split("continue with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith(f"python {PPO_SCRIPT} ") and command.endswith(f" --resume {out}/checkpoint-2")
    bin_dir = os.path.dirname(sys.executable)  # `python` as the user's shell finds it, in this environment
    resumed = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600,
                             env=child_env(PATH=bin_dir + os.pathsep + os.environ["PATH"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after update 2" in resumed.stdout
    bar = re.findall(r"(\d+)/(\d+) \[", resumed.stderr)  # counts the whole run's updates
    assert {total for _, total in bar} == {"6"} and bar[-1] == ("6", "6")
    assert json.loads((out / "eval.json").read_text())["updates_this_run"] == 4


@pytest.mark.slow
def test_dpo_on_a_disk_that_fills_at_the_trained_adapter_says_so_and_leaves_no_half_written_file(dpo_assets, tmp_path):
    """No checkpoints (--save_steps 0), and a tmpfs too small for the adapter: one paragraph that says nothing
    trained is kept, no traceback, exit 1, and no adapter file that would pass for a trained model."""
    out = tmp_path / "run"
    argv = tiny_argv(dpo_assets, out, "--max_steps", "2", "--eval_steps", "0", "--num_eval_generations", "0",
                     "--max_eval_samples", "8")
    failed = on_a_small_disk(DPO_SCRIPT, argv, out, kib=48)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    message = " ".join(failed.stderr.split())
    assert f"Could not save the trained adapter in '{out}': " in message and "The disk is full (" in message
    assert "what was saved before is kept (none). Free some space, then run again." in message
    assert written_files(out) == ["settings.json"]


# ---------------------------------------------------------------------------------------------- several processes
def test_under_torchs_launcher_the_ctrl_c_it_passes_on_is_not_taken_for_a_second_one(monkeypatch):
    """A terminal's Ctrl-C reaches each process twice under accelerate launch: from the terminal, and a moment later
    from torch's launcher, which passes it on. The second within a second is the same Ctrl-C: training finishes its
    step and saves. Without the launcher, a second Ctrl-C stops at once."""
    for launcher, stops_at_once in ((True, False), (False, True)):
        if launcher:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        else:
            monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        stop = ppo.StopRequest()
        stop.enter("training")
        stop.handle(signal.SIGINT, None)
        if stops_at_once:
            with pytest.raises(SystemExit) as stopped:
                stop.handle(signal.SIGINT, None)
            assert stopped.value.code == 130
        else:
            stop.handle(signal.SIGINT, None)
            assert stop.signal_name == "SIGINT"


def test_a_write_that_fails_on_one_process_stops_every_process_and_the_main_one_says_why(tmp_path):
    """Process 1 cannot write (process 0 can): neither waits forever for the other, nothing of the save is left,
    both exit with 1, and the main process alone prints the paragraph, with process 1's error. Two CPU processes
    joined as accelerate joins them."""
    import torch.multiprocessing

    torch.multiprocessing.spawn(save_and_fail_on_rank_1, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    said = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert said[1] == {"code": 1}
    assert said[0]["code"].startswith("\nerror: Could not save checkpoint-1 in ")
    assert "OSError: [Errno 28] No space left on device. The disk is full (" in " ".join(said[0]["code"].split())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def save_and_fail_on_rank_1(rank: int, directory: str, port: int):
    from accelerate import PartialState

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    PartialState(cpu=True)  # joins the two processes over gloo
    out = os.path.join(directory, "out")
    os.makedirs(out, exist_ok=True)

    def save(staging):
        os.makedirs(os.path.join(staging, "checkpoint-1"), exist_ok=True)
        if rank == 1:
            raise OSError(errno.ENOSPC, FULL)

    try:
        ppo.save_atomically(out, save, "checkpoint-1")
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as handle:
        json.dump({"code": code}, handle)
