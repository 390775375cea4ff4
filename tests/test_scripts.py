"""What both scripts share: the plumbing appendix (identical text), --help, the command line's errors, the resume
command, gated and unreachable hubs, and running as a notebook."""
import json
import os
import re
import shutil

import pytest

import dpo_llama2_stackexchange as dpo
import ppo_gpt2_imdb as ppo
from helpers import DPO_SCRIPT, PPO_SCRIPT, REPO, run_cli, stops_with, tiny_argv

SCRIPTS = [(PPO_SCRIPT, ppo), (DPO_SCRIPT, dpo)]


def shared_plumbing(script: str) -> str:
    text = open(os.path.join(REPO, script)).read()
    return text[text.index("# <shared plumbing>") : text.index("# </shared plumbing>")]


def test_the_shared_plumbing_appendix_is_the_same_text_in_both_scripts():
    ppo_text, dpo_text = shared_plumbing(PPO_SCRIPT), shared_plumbing(DPO_SCRIPT)
    assert len(ppo_text.splitlines()) > 300
    assert ppo_text == dpo_text


@pytest.mark.slow
@pytest.mark.parametrize("script, module", SCRIPTS)
def test_help_lists_every_setting_and_says_what_each_boolean_flag_does(script, module):
    completed = run_cli(script, ["--help"])
    assert completed.returncode == 0
    assert completed.stdout.startswith("usage: ") and completed.stderr == ""  # no library notice before it
    text = " ".join(completed.stdout.split())
    assert "option_strings" not in text  # what a bare % in a help text prints: argparse's own fields
    unwrapped = "".join(text.split())  # help is wrapped, at spaces and after hyphens
    for name, spec in module.Args.__dataclass_fields__.items():  # every setting is listed with its whole help
        assert f"--{name}" in text and "".join(spec.metadata["help"].split()) in unwrapped, name
        if spec.type in (bool, "bool") and spec.default is True:  # and a --no_ flag that says what it does
            assert re.search(rf"--no_{name}, --no-{name.replace('_', '-')} turn --{name} off(?! \()", text), name
    assert re.search(r"--no_tf32, --no-tf32 turn --tf32 off --", text)  # no "(default: False)" to misread


@pytest.mark.slow
@pytest.mark.parametrize("script, module", SCRIPTS)
def test_a_bad_setting_on_the_command_line_exits_1_with_one_paragraph_and_no_traceback(script, module, tmp_path):
    completed = run_cli(script, ["--output_dir", str(tmp_path), "--learning_rate", "-1", "--device", "cpu"])
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr and completed.stderr.strip().startswith("error: --learning_rate")
    assert completed.stderr.strip().count("\n\n") == 0


@pytest.mark.slow
@pytest.mark.parametrize("script, module", SCRIPTS)
def test_an_unknown_setting_on_the_command_line_is_named(script, module, tmp_path):
    """A typo as a user meets it: exit 1, the paragraph on stderr, no traceback, no usage block."""
    completed = run_cli(script, ["--learnig_rate", "0.1", "--output_dir", str(tmp_path)])
    assert completed.returncode == 1 and "Traceback" not in completed.stderr and "usage:" not in completed.stderr
    assert re.search(r"^error: unrecognized arguments: --learnig_rate 0.1\. `python \S+ --help` lists every setting",
                     " ".join(completed.stderr.split()))


@pytest.mark.parametrize("script, module", SCRIPTS)
def test_values_argparse_refuses_stop_with_one_paragraph_and_abbreviations_are_unknown_settings(script, module,
                                                                                                tmp_path):
    """A value of the wrong type, a missing value: one paragraph and exit 1 (argparse's own would print the whole
    usage and exit 2). A prefix of a setting's name is not taken for it (argparse's default): it is unknown."""
    for argv, expected in (
            (["--seed", "abc"], r"^error: argument --seed: invalid int value: 'abc'. `python \S+ --help` lists"),
            (["--seed"], r"^error: argument --seed: expected one argument."),
            (["--overwrite_output_dir", "maybe"], r"Truthy value expected: got maybe .*insensitive\)\. `python"),
            (["--learning_rat", "0.1"], r"^error: unrecognized arguments: --learning_rat 0.1\. "),
            (["--see", "3"], r"^error: unrecognized arguments: --see 3\. ")):
        message = stops_with(expected, module.parse_args, [*map(str, argv), "--output_dir", str(tmp_path)])
        assert message.strip().count("\n\n") == 0 and "usage:" not in message


@pytest.mark.parametrize("script, module", SCRIPTS)
def test_a_bare_resume_means_the_latest_checkpoint_and_a_path_that_checkpoint(script, module):
    assert module.parse_args(["--resume"]).resume == module.parse_args(["--resume", "--seed", "1"]).resume == "latest"
    assert module.parse_args(["--resume", "out/checkpoint-2"]).resume == module.parse_args(
        ["--resume=out/checkpoint-2"]).resume == "out/checkpoint-2"
    assert module.parse_args([]).resume is None


def test_numbers_must_be_finite_and_the_output_dir_writable(tmp_path):
    """nan passes every comparison a range check makes (--kl_coef nan trained on nan losses until generate
    failed); inf passed 'positive'."""
    for module, setting in ((ppo, "--kl_coef"), (ppo, "--learning_rate"), (dpo, "--weight_decay")):
        for value in ("nan", "inf"):
            stops_with(rf"--{setting[2:]} must be .*got {value}", module.validate,
                       module.parse_args([setting, value, "--output_dir", str(tmp_path)]))
    (tmp_path / "a_file").write_text("")
    stops_with(r"--output_dir '.*a_file' .*Choose a directory you can write to", ppo.validate,
               ppo.parse_args(["--output_dir", str(tmp_path / "a_file")]))


def test_the_resume_command_drops_every_form_of_resume_and_overwrite():
    for argv in (["--seed", "1", "--resume", "out/checkpoint-50", "--output_dir", "out"],
                 ["--seed", "1", "--resume=out/checkpoint-50", "--output_dir", "out"],
                 ["--seed", "1", "--resume", "--output_dir", "out", "--overwrite_output_dir"],
                 ["--seed", "1", "--overwrite_output_dir", "true", "--output_dir", "out", "--resume"]):
        command = ppo.resume_command("out/checkpoint-100", argv)
        assert command == "python ppo_gpt2_imdb.py --seed 1 --output_dir out --resume out/checkpoint-100", argv
    assert dpo.resume_command("my dir/checkpoint-3", ["--output_dir", "my dir"]) == \
        "python dpo_llama2_stackexchange.py --output_dir 'my dir' --resume 'my dir/checkpoint-3'"


def test_the_resume_command_of_a_run_on_several_processes_launches_as_many(monkeypatch):
    """As accelerate launch and torchrun set the environment: --multi_gpu too, which starts several processes even
    on a machine without GPUs (without it accelerate starts one there)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    note = "\n  (it ran on 2 processes: add any other launcher option it had)"  # a config file, say
    assert ppo.resume_command("out/checkpoint-4", ["--seed", "1"]) == \
        "torchrun --nproc_per_node 2 ppo_gpt2_imdb.py --seed 1 --resume out/checkpoint-4" + note
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert ppo.resume_command("out/checkpoint-4", ["--seed", "1"]) == "accelerate launch --multi_gpu " \
        "--num_processes 2 --mixed_precision bf16 ppo_gpt2_imdb.py --seed 1 --resume out/checkpoint-4" + note


@pytest.mark.parametrize("module, marker", [(ppo, "counters.json"), (dpo, "trainer_state.json")], ids=["ppo", "dpo"])
def test_continuing_a_finished_run_deletes_its_eval_json_and_model_before_training_starts(module, marker, tmp_path,
                                                                                          capsys):
    """--resume --overwrite_output_dir over a finished run: the checkpoint is resumed, and eval.json and the saved
    weights (value model and merged model too) are gone before the first update, so a continuation interrupted
    midway leaves an unfinished run (that --resume continues), never the old evaluation or model beside newer
    checkpoints. The end-to-end tests cannot see this: the continued run writes both again."""
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / marker).write_text("{}")
    for name in ("eval.json", "model.safetensors", "adapter_model.safetensors", "tokenizer.json",
                 "value_model/model.safetensors", "merged/model.safetensors", "tiny_assets/gpt2/model.safetensors"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    args = module.parse_args(["--output_dir", str(out), "--resume", "--overwrite_output_dir"])
    (out / "settings.json").write_text(json.dumps(vars(args)))
    assert module.prepare_output_dir(args, marker) == str(out / "checkpoint-2")
    assert sorted(os.listdir(out)) == ["checkpoint-2", "settings.json", "tiny_assets", "tokenizer.json"]
    assert (out / "tiny_assets" / "gpt2" / "model.safetensors").exists()  # the tiny preset's models are kept
    assert re.search(r"--overwrite_output_dir: deleted .*eval.json.*saved models.*; continuing from .*checkpoint-2",
                     capsys.readouterr().out)


@pytest.mark.parametrize("module, marker", [(ppo, "counters.json"), (dpo, "trainer_state.json")], ids=["ppo", "dpo"])
def test_resume_given_a_run_directory_or_a_finished_run_without_checkpoints_says_what_would_work(module, marker,
                                                                                             tmp_path):
    """--resume OUTPUT_DIR (not one of its checkpoints) used to be called a damaged checkpoint, with advice to start
    fresh with --overwrite_output_dir, which deletes the checkpoints; a finished run that kept no checkpoint (the
    tiny preset's --save_steps 0) was offered a continuation from a checkpoint it does not have."""
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / marker).write_text("{}")
    message = stops_with(rf"--resume '.*run' is not a checkpoint of this script \(a checkpoint-N folder with {marker}\)"
                         r". Nothing was loaded. Use --resume alone for the latest one in --output_dir, or --resume "
                         r".*run/checkpoint-3\.", module.prepare_output_dir,
                         module.parse_args(["--output_dir", str(out), "--resume", str(out)]), marker)
    assert "overwrite_output_dir" not in message
    (tmp_path / "elsewhere").mkdir()
    message = stops_with(r"--resume '.*elsewhere' is not a checkpoint of this script .* Nothing was loaded",
                         module.prepare_output_dir,
                         module.parse_args(["--output_dir", str(out), "--resume", str(tmp_path / "elsewhere")]), marker)
    assert "overwrite_output_dir" not in message
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "eval.json").write_text("{}")
    message = stops_with(r"holds a finished run .*(no checkpoint|kept none).*--save_steps.* Nothing was changed.* "
                         r"--overwrite_output_dir", module.prepare_output_dir,
                         module.parse_args(["--output_dir", str(finished), "--resume"]), marker)
    assert "continue from that checkpoint" not in message


@pytest.mark.parametrize("module, marker", [(ppo, "counters.json"), (dpo, "trainer_state.json")], ids=["ppo", "dpo"])
def test_resume_given_a_path_that_is_not_a_directory_stops_with_one_paragraph(module, marker, tmp_path):
    """A mistyped --resume PATH (nothing there, or a file) is named in one paragraph before anything loads, as every
    other refusal of a checkpoint is, not with a traceback from the library that lists the folder."""
    (tmp_path / "a_file").write_text("")
    for path in (tmp_path / "missing", tmp_path / "a_file"):
        args = module.parse_args(["--output_dir", str(tmp_path / "run"), "--resume", str(path), "--device", "cpu",
                                  *(["--optim", "adamw_torch"] if module is dpo else [])])

        def start():  # as main() starts: the settings check, then the output dir
            module.validate(args)
            module.prepare_output_dir(args, marker)

        message = stops_with(rf"--resume '{path}'", start)
        assert message.strip().count("\n\n") == 0


@pytest.mark.parametrize("script, module", SCRIPTS)
def test_a_tiny_run_copied_elsewhere_resumes_but_not_with_another_model(script, module, tmp_path):
    """The tiny preset's model and data paths lie in its assets dir (by default inside the output dir): a copied
    run is the same run. Another model or dataset is not: a resume would train the checkpoint on what it never saw."""
    out = tmp_path / "copy"
    (out / "checkpoint-1").mkdir(parents=True)
    original = module.parse_args(["--preset", "tiny", "--output_dir", str(tmp_path / "original")])
    (out / "settings.json").write_text(json.dumps(vars(original)))
    module.check_resume_settings(module.parse_args(["--preset", "tiny", "--output_dir", str(out)]),
                                 str(out / "checkpoint-1"))
    stops_with(r"trained with other settings \(--model_name_or_path .* -> elsewhere/model\)",
               module.check_resume_settings, module.parse_args(
                   ["--preset", "tiny", "--output_dir", str(out), "--model_name_or_path", "elsewhere/model"]),
               str(out / "checkpoint-1"))


@pytest.mark.parametrize("module, marker", [(ppo, "counters.json"), (dpo, "trainer_state.json")], ids=["ppo", "dpo"])
def test_starting_over_keeps_the_models_this_run_loads_and_files_that_are_not_a_runs(module, marker, tmp_path,
                                                                                     capsys):
    """--overwrite_output_dir with --model_name_or_path pointing at the earlier run's model (or its merged/ copy)
    used to delete that model before loading it. A user's own file whose name merely begins with "model" is no
    saved model: it neither marks the dir as a finished run nor is deleted."""
    out = tmp_path / "run"
    for name in ("eval.json", "model.safetensors", "model_v0_backup.bin", "value_model/model.safetensors",
                 "merged/model.safetensors", "checkpoint-2/" + marker):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    loads = ["--model_name_or_path", str(out / "merged")] if module is dpo else \
        ["--model_name_or_path", str(out)]
    args = module.parse_args(["--output_dir", str(out), "--overwrite_output_dir", *loads])
    assert module.prepare_output_dir(args, marker) is None
    kept = ["merged"] if module is dpo else ["model.safetensors"]
    assert sorted(os.listdir(out)) == sorted(["model_v0_backup.bin", "settings.json", *kept])  # value_model/ went
    assert f"(kept {', '.join(kept)}: this run loads from there)" in capsys.readouterr().out
    (out / "eval.json").unlink(missing_ok=True)
    for name in kept:
        (out / name).unlink() if (out / name).is_file() else shutil.rmtree(out / name)
    assert module.finished_run_files(str(out)) == []  # the backup alone: no finished run here
    assert module.prepare_output_dir(module.parse_args(["--output_dir", str(out)]), marker) is None


@pytest.mark.parametrize("module, marker", [(ppo, "counters.json"), (dpo, "trainer_state.json")], ids=["ppo", "dpo"])
def test_starting_over_deletes_the_checkpoints_and_not_a_file_whose_name_begins_like_one(module, marker, tmp_path,
                                                                                         capsys):
    """--overwrite_output_dir over an unfinished run deletes its checkpoint-N folders; a user's own file whose name
    merely begins with "checkpoint-" is no checkpoint, and is kept (not taken for a folder to delete)."""
    out = tmp_path / "run"
    for name in ("checkpoint-2/" + marker, "checkpoint-4/" + marker, "checkpoint-notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    args = module.parse_args(["--output_dir", str(out), "--overwrite_output_dir"])
    assert module.prepare_output_dir(args, marker) is None
    assert sorted(os.listdir(out)) == ["checkpoint-notes.txt", "settings.json"]
    assert "2 checkpoint(s)" in capsys.readouterr().out


@pytest.mark.parametrize("script, module", SCRIPTS)
def test_every_setting_a_resume_must_match_is_a_setting_of_the_script(script, module):
    """The resume check compares only names found in the run's settings.json, so a misspelt name in
    RESUME_MUST_MATCH would silently never be compared."""
    assert set(module.RESUME_MUST_MATCH) <= set(module.Args.__dataclass_fields__)
    assert {"seed", "learning_rate", "gradient_accumulation_steps"} <= set(module.RESUME_MUST_MATCH)


def test_the_tiny_preset_says_it_builds_before_the_wait_and_nothing_once_built(ppo_assets, dpo_assets, tmp_path,
                                                                               monkeypatch, capsys):
    """A first tiny run used to sit silent between the preset's line and "Built ..." (13 s idle on 2 cores, 80 s on
    a busy machine)."""
    class Interrupted(Exception):
        pass

    def interrupt(*args):
        raise Interrupted  # the build itself is not what this test waits for

    for module, assets in ((ppo, ppo_assets), (dpo, dpo_assets)):
        module.build_tiny_assets(assets)
        assert capsys.readouterr().out == ""  # built already: reused without a word
        monkeypatch.setattr(module.random, "Random", interrupt)
        with pytest.raises(Interrupted):
            module.build_tiny_assets(str(tmp_path / module.__name__))
        assert capsys.readouterr().out.startswith("Building the tiny preset's models and data in ")


def test_running_out_of_memory_while_loading_is_not_blamed_on_the_file():
    """Every other error while loading is explained as the file's or the hub's; memory is neither, and PyTorch's
    own message (how much was asked, what is free) says more than "Check --model_name_or_path" would."""
    import torch

    def load(name):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for module in (ppo, dpo):
        with pytest.raises(torch.OutOfMemoryError):
            module.load_or_explain(load, "meta-llama/Llama-2-7b-hf", "model_name_or_path")


def explained(module, err: Exception, name: str) -> str:
    """The paragraph load_or_explain stops with when loading `name` raises `err`."""
    def load(path):
        raise err

    return " ".join(stops_with("", module.load_or_explain, load, name, "model_name_or_path").split())


def test_gated_models_are_told_apart_by_the_hubs_answer_not_by_a_number_in_a_path(tmp_path):
    """By the hub client's GatedRepoError, alone or chained into transformers' own OSError as transformers raises
    it; a 401 in a message, or a number in a path, is no gated repository."""
    from huggingface_hub.errors import GatedRepoError

    error = GatedRepoError.__new__(GatedRepoError)  # as the hub client raises it (its response left out)
    Exception.__init__(error, "Access to model meta-llama/Llama-2-7b-hf is restricted.")
    try:
        try:
            raise error
        except GatedRepoError as cause:
            raise OSError("You are trying to access a gated repo. Make sure to have access to it.") from cause
    except OSError as raised:
        chained = raised
    for module in (ppo, dpo):
        for err in (error, chained):
            gated = explained(module, err, "meta-llama/Llama-2-7b-hf")
            assert "gated" in gated and "license" in gated and "HF_TOKEN" in gated and "hf auth login" in gated
            assert "--model_name_or_path" in gated
        http = explained(module, OSError("401 Client Error: Unauthorized for url"), "x/y")
        assert "It is gated" not in http and "401 Client Error" in http
        (tmp_path / "checkpoint-401").mkdir(exist_ok=True)
        local = explained(module, OSError("Error no file named model.safetensors found in directory checkpoint-401."),
                          str(tmp_path / "checkpoint-401"))
        assert "It is gated" not in local and "no file named model.safetensors" in local


@pytest.mark.parametrize("module", [ppo, dpo], ids=["ppo", "dpo"])
def test_only_a_hub_name_that_fails_to_load_suggests_the_offline_tiny_preset(module, tmp_path):
    """A hub id that cannot be loaded (hub down, gated, a bad file) points to `--preset tiny`, the offline way to try
    the pipeline. A local path is the user's own file or the tiny preset's: suggesting the preset there (as before,
    even inside a tiny run whose assets were broken) sends the reader nowhere. The hub's error is transformers'
    own, here offline (the tests set HF_HUB_OFFLINE), with the hub client's LocalEntryNotFoundError chained in."""
    from transformers import AutoConfig

    hub = stops_with(r"^error: Could not load 'someone/model' \(--model_name_or_path\): OSError: We couldn't connect "
                     r"to 'https://huggingface.co'.* Check --model_name_or_path.*--preset tiny", module.load_or_explain,
                     AutoConfig.from_pretrained, "someone/model", "model_name_or_path")
    assert hub.strip().count("\n\n") == 0
    broken = OSError("Error no file named model.safetensors found in directory.")
    for local in (tmp_path / "tiny_assets" / "gpt2", tmp_path / "outputs" / "run" / "checkpoint-2"):
        local.mkdir(parents=True)
        message = explained(module, broken, str(local))
        assert "no file named model.safetensors" in message and "--preset tiny" not in message
    missing = stops_with(r"looks like a local path, but nothing exists there", module.load_or_explain,
                         lambda name: None, str(tmp_path / "missing"), "model_name_or_path")
    assert "--preset tiny" not in " ".join(missing.split())


@pytest.mark.parametrize("module", [ppo, dpo], ids=["ppo", "dpo"])
def test_a_tiny_run_over_a_finished_run_is_refused_before_the_tiny_assets_are_built(module, tmp_path):
    """The refusal to overwrite a finished run comes before anything is built or written: before, a tiny run with
    fresh --tiny_assets_dir built its models and data (about a minute on 2 cores) and only then refused. The
    refusal now takes no build, and the assets folder is never made."""
    finished, assets = tmp_path / "finished", tmp_path / "fresh_assets"
    finished.mkdir()
    (finished / "eval.json").write_text("{}")
    stops_with(r"holds a finished run .* a new run would overwrite it. Nothing was changed", module.main,
               module.parse_args(tiny_argv(assets, finished)))
    assert not assets.exists() and os.listdir(finished) == ["eval.json"]


@pytest.mark.parametrize("module", [ppo, dpo], ids=["ppo", "dpo"])
def test_a_tiny_run_with_a_relative_assets_dir_loads_its_models_from_there(module, tmp_path, monkeypatch,
                                                                           ppo_assets, dpo_assets):
    """--tiny_assets_dir tiny makes 'tiny/gpt2', which reads as a hub id (OWNER/NAME) until the folder exists: once
    the assets are built there, the model, its tokenizer and the data load from the folder, not from the hub (which
    the tests keep offline: asking it would fail)."""
    from datasets import load_dataset
    from transformers import AutoConfig

    monkeypatch.chdir(tmp_path)
    args = module.parse_args(["--preset", "tiny", "--tiny_assets_dir", "tiny", "--output_dir", "out"])
    assert not module.looks_local(args.model_name_or_path)  # before the build: a bare name reads as a hub id
    os.symlink(ppo_assets if module is ppo else dpo_assets, tmp_path / "tiny")  # as built by the preset
    assert module.looks_local(args.model_name_or_path) and module.looks_local(args.dataset_name)
    assert module.load_or_explain(AutoConfig.from_pretrained, args.model_name_or_path, "model_name_or_path")
    assert len(module.load_checked_tokenizer(args.model_name_or_path, "model_name_or_path")) > 100
    where = {"data_dir": args.train_data_dir} if module is dpo else {}
    assert len(module.load_or_explain(lambda name: load_dataset(name, split="train", **where), args.dataset_name,
                                      "dataset_name")) > 0


@pytest.mark.slow
def test_an_unreachable_hub_is_said_once_in_one_paragraph(tmp_path):
    """Without a connection each hub load used to print retry lines for about 45 s before the script's message. Now
    the first load that needs the hub fails after the hub client's own retries (their lines silenced) with one
    paragraph that names the setting and says the hub cannot be reached, and exit 1. One script: the code is the
    shared appendix's. A user waits out the retries' backoff (about 47 s here); the test skips its sleeps (a
    sitecustomize in the child), every request and retry still made."""
    (tmp_path / "sitecustomize.py").write_text(
        "import types, time, huggingface_hub.utils._http as http\n"
        "http.time = types.SimpleNamespace(**{**vars(time), 'sleep': lambda seconds: None})\n")
    argv = ["--output_dir", str(tmp_path / "out"), "--device", "cpu", "--report_to", "none"]
    completed = run_cli(PPO_SCRIPT, argv, HF_ENDPOINT="https://hub.invalid", HF_HUB_OFFLINE="0",
                        HF_DATASETS_OFFLINE="0", PYTHONPATH=str(tmp_path))
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1 and "Traceback" not in output and "Retry" not in output, output[-3000:]
    paragraph = completed.stderr.strip()
    assert paragraph.startswith("error: Could not load ") and paragraph.count("\n\n") == 0, paragraph
    assert re.search(r"\(--model_name_or_path\): OSError: We couldn't connect to 'https://hub.invalid'.* Check "
                     r"--model_name_or_path", " ".join(paragraph.split())), paragraph


def notebook_from(script: str, tmp_path, **constants):
    """The script converted with jupytext, after editing constants in Args as a notebook user would."""
    import jupytext

    text = open(os.path.join(REPO, script)).read()
    for name, value in constants.items():
        text, count = re.subn(rf"(\n    {name}: [^=]+= arg\()([^,]+|\"[^\"]*\")(,)", rf"\g<1>{value!r}\g<3>", text, 1)
        assert count == 1, name
    return jupytext.reads(text, fmt="py:percent")


@pytest.mark.slow
@pytest.mark.parametrize("script, constants, replaced, check", [
    (PPO_SCRIPT, dict(num_ppo_epochs=1, total_episodes=640), "total_episodes 640 -> 3072", "reward_mean"),
    (DPO_SCRIPT, dict(lora_r=4, num_eval_generations=1, max_steps=100), "max_steps 100 -> 150", "accuracy"),
])
def test_run_all_in_a_jupyter_kernel_trains_with_the_constants_as_edited(script, constants, replaced, check,
                                                                          tmp_path, ppo_assets, dpo_assets):
    """jupytext turns the script into a notebook; nbclient runs every cell in a real ipykernel, whose own command
    line is ignored. The constants edited in Args are used (preset, output dir, a PPO epoch count, a LoRA rank);
    one the preset replaces is named in the preset line; eval.json is written, the table is printed, and the
    trained model beats the reference (PPO: reward +1.0, DPO: accuracy +0.2). PPO runs one epoch per update, which
    halves its training time and still learns (measured on 2 CPU cores: reward -1.90 -> 3.56; -1.90 -> 3.69 with
    three epochs)."""
    from nbclient import NotebookClient

    out = tmp_path / "out"
    assets = ppo_assets if script == PPO_SCRIPT else dpo_assets
    notebook = notebook_from(script, tmp_path, preset="tiny", tiny_assets_dir=str(assets), output_dir=str(out),
                             report_to="none", **constants)
    assert len(notebook.cells) >= 13
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": REPO}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "preset tiny changes: " in printed and replaced in printed and "=== Held-out" in printed
    result = json.loads((out / "eval.json").read_text())
    first, last = ("reference", "trained") if script == PPO_SCRIPT else ("base", "trained")
    assert result["args"]["output_dir"] == str(out) and result["args"]["report_to"] == "none"
    for name, value in list(constants.items())[:-1]:  # the last one is the preset's to replace
        assert result["args"][name] == value
    margin = 1.0 if script == PPO_SCRIPT else 0.2
    assert result[last][check] > result[first][check] + margin
