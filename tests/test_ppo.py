"""PPO script: data preparation, the reward adapter, clear errors, full tiny runs, learning, resume and interrupts."""
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import ppo_gpt2_imdb as ppo
from helpers import (HUB, PPO_SCRIPT, REPO, accelerate_launch, as_if_interrupted_after_its_checkpoints, free_port,
                     launch_then_interrupt, run_cli, run_printed_launch, run_then_signal, run_tiny, sentiment_words,
                     stops_with, tiny_argv)


def tiny_args(assets, tmp_path, *extra):
    return ppo.parse_args(tiny_argv(assets, tmp_path, *extra))


def write_reviews(directory, rows, split="train"):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{split}.jsonl"), "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(directory)


# ---------------------------------------------------------------------------------------------- settings
def test_preset_changes_only_defaults_says_which_and_explicit_flags_win(tmp_path, monkeypatch, capsys):
    default = ppo.parse_args([])
    assert default.model_name_or_path == "lvwerra/gpt2-imdb" and default.learning_rate == 1.41e-5
    assert default.batch_size == 128 and default.num_ppo_epochs == 4 and default.response_length == 16
    assert capsys.readouterr().out == ""  # no preset: no line
    tiny = ppo.parse_args(["--preset", "tiny", "--output_dir", str(tmp_path)])
    assert tiny.model_name_or_path == os.path.join(str(tmp_path), "tiny_assets", "gpt2")
    assert not tiny.static_cache_generation and not tiny.compile_ppo_epochs  # too short to earn back a compile
    assert tiny.learning_rate == ppo.PRESETS["tiny"]["learning_rate"] and tiny.report_to == "wandb"
    explicit = ppo.parse_args(["--preset", "tiny", "--learning_rate", "0.5", "--model_name_or_path", "my/model"])
    assert explicit.learning_rate == 0.5 and explicit.model_name_or_path == "my/model"
    # A constant edited in Args and then replaced by the preset: the line shows the edited value being replaced.
    capsys.readouterr()
    monkeypatch.setattr(ppo.Args.__dataclass_fields__["learning_rate"], "default", 2e-5)
    ppo.parse_args(["--preset", "tiny", "--batch_size", "8"])
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("preset tiny changes: ") and "learning_rate 2e-05 -> 0.0005" in line
    assert " batch_size" not in line  # given on the command line: the preset changed nothing there


def test_the_training_line_says_when_the_first_update_compiles():
    """On a GPU the defaults' first update compiles the static-cache decode and the PPO epochs' pass (about a minute,
    once): the Training line says so, so that a long first step does not look like a hang. A run that compiles
    nothing (no GPU, or both settings off) adds nothing; a resumed run says where it resumes from."""
    from types import SimpleNamespace

    def line(gpu: bool, *argv, updates_done=0, checkpoint=None):
        trainer = SimpleNamespace(total_updates=96, updates_done=updates_done, gpu_layout=gpu,
                                  accelerator=SimpleNamespace(num_processes=1, device="cuda:0" if gpu else "cpu"))
        return ppo.training_line(ppo.parse_args(list(argv)), trainer, checkpoint)

    both = line(True)
    assert both.startswith("Training: 96 PPO updates of 128 prompts per process on 1 x cuda:0")
    assert "the first update also compiles (a minute or so, once)" in both
    assert "compiles" in line(True, "--static_cache_generation", "false")
    assert "compiles" not in line(True, "--static_cache_generation", "false", "--compile_ppo_epochs", "false")
    assert "compiles" not in line(False)  # the GPU-only settings are not used without a GPU
    resumed = line(False, updates_done=40, checkpoint="out/checkpoint-40")
    assert "resuming after update 40 from out/checkpoint-40" in resumed


def test_the_gpu_only_settings_are_not_used_without_a_gpu(ppo_assets, tmp_path, monkeypatch, capsys):
    """--static_cache_generation, --compile_ppo_epochs and --bf16_autocast are on by default (the layout measured
    fastest on an H200) and need a GPU: without one a run simply does not use them, whatever they say, and trains
    eagerly in fp32 with the dynamic cache."""
    monkeypatch.setattr(ppo, "compile_ppo_epochs", lambda *args, **kwargs: pytest.fail("compiled without a GPU"))
    monkeypatch.setattr(ppo, "rollouts_decode_into", lambda *args, **kwargs: pytest.fail("static cache on a CPU"))
    precision, build = [], ppo.PPOTrainer.__init__
    monkeypatch.setattr(ppo.PPOTrainer, "__init__", lambda self, *args, **kwargs: (
        precision.append(os.environ.get("ACCELERATE_MIXED_PRECISION")), build(self, *args, **kwargs))[1])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    result = run_tiny(ppo, ppo_assets, tmp_path, "--total_episodes", "64", "--num_eval_prompts", "8",
                      "--static_cache_generation", "true", "--compile_ppo_epochs", "true", "--bf16_autocast", "true",
                      "--device", "cpu")  # as on a machine without one
    assert result["updates"] == 2 and precision == [None]
    training = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Training: ")]
    assert len(training) == 1 and "compiles" not in training[0]


# ---------------------------------------------------------------------------------------------- data
def test_prompts_are_long_reviews_cut_to_2_to_8_tokens_with_disjoint_held_out_set(ppo_assets, tmp_path):
    args = tiny_args(ppo_assets, tmp_path)
    tokenizer = ppo.load_policy_tokenizer(args)
    train, held_out = ppo.load_prompts(args, tokenizer)
    assert all(len(review) > args.min_review_chars for review in list(train["review"]) + list(held_out["review"]))
    raw_train = [json.loads(line)["text"] for line in open(os.path.join(ppo_assets, "reviews", "train.jsonl"))]
    assert len(train) == sum(len(text) > args.min_review_chars for text in raw_train) < len(raw_train)
    lengths = [len(ids) for ids in list(train["input_ids"])]
    assert min(lengths) == args.prompt_min_tokens and max(lengths) == args.prompt_max_tokens
    for ids, review in zip(list(train["input_ids"])[:50], list(train["review"])[:50]):
        assert ids == tokenizer(review, add_special_tokens=False)["input_ids"][: len(ids)]  # a true prefix
    assert len(held_out) == args.num_eval_prompts
    assert not set(held_out["review"]) & set(train["review"])
    again = ppo.load_prompts(args, tokenizer)[1]
    assert list(again["input_ids"]) == list(held_out["input_ids"])  # fixed: same prompts every run with the same seed


def test_reviews_without_text_are_dropped_with_a_count(ppo_assets, tmp_path, capsys):
    good = [json.loads(line) for line in open(os.path.join(ppo_assets, "reviews", "train.jsonl"))][:200]
    rows = good + [{"text": None, "label": 1}, {"text": "", "label": 0}, {"text": "   ", "label": 1}]
    directory = write_reviews(tmp_path / "reviews", rows)
    write_reviews(tmp_path / "reviews", good[:100], split="test")
    args = tiny_args(ppo_assets, tmp_path / "out", "--dataset_name", directory, "--batch_size", "8",
                     "--num_mini_batches", "1")
    reviews = ppo.load_reviews(args, "train", "dataset_train_split")
    kept = sum(len(row["text"]) > args.min_review_chars for row in good)
    assert len(reviews) == kept
    assert f"train: kept {kept} of 203 reviews; dropped 3 with no text" in capsys.readouterr().out


def test_missing_text_column_empty_dataset_and_missing_split_are_explained(ppo_assets, tmp_path):
    args = tiny_args(ppo_assets, tmp_path, "--text_column", "body")
    stops_with(r"no 'body' column \(it has: text, label\).*--text_column", ppo.load_prompts, args,
               ppo.load_policy_tokenizer(args))
    args = tiny_args(ppo_assets, tmp_path, "--min_review_chars", "100000")
    stops_with(r"No review is left in the 'train' split .*: dropped 0 with no text and \d+ of --min_review_chars "
               r"100000 or fewer\. .*or lower --min_review_chars", ppo.load_prompts, args,
               ppo.load_policy_tokenizer(args))
    args = tiny_args(ppo_assets, tmp_path, "--dataset_eval_split", "validation")
    stops_with(r"Unknown split \"validation\".*Check --dataset_name and --dataset_eval_split", ppo.load_prompts,
               args, ppo.load_policy_tokenizer(args))
    args = tiny_args(ppo_assets, tmp_path, "--text_column", "label")  # a column, but not of text: all dropped
    stops_with(r"No review is left in the 'train' split .*: dropped \d+ with no text and 0 .* Set --text_column to the "
               r"column holding the review text \('label' now\)", ppo.load_prompts, args,
               ppo.load_policy_tokenizer(args))
    args = tiny_args(ppo_assets, tmp_path, "--dataset_eval_split", "train")  # used to crash in select_columns
    stops_with(r"No held-out review is left: every review of the 'train' split \(--dataset_eval_split\) is also in "
               r"the 'train' split", ppo.load_prompts, args, ppo.load_policy_tokenizer(args))


def test_broken_local_files_and_mistyped_paths_are_named_in_a_paragraph(ppo_assets, tmp_path):
    """Each used to end in a library's traceback: StopIteration (an empty JSONL file), DatasetGenerationError (a
    malformed one, its parse error only in the cause), SafetensorError (a truncated model). A mistyped relative path
    got the hub's repo-id rules."""
    write_reviews(tmp_path / "empty", [])
    write_reviews(tmp_path / "empty", [], split="test")
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "train.jsonl").write_text('{"text": "a"\n{oops\n')
    truncated = tmp_path / "gpt2"
    shutil.copytree(os.path.join(ppo_assets, "gpt2"), truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:5000])
    for setting, value, expected in (
            ("--dataset_name", tmp_path / "empty", r"Could not load '.*empty' \(--dataset_name and "
                                                   r"--dataset_train_split\): StopIteration\b.* Check --dataset_name"),
            ("--dataset_name", malformed, r"generating the dataset.*ArrowInvalid: JSON parse error"),
            ("--model_name_or_path", truncated, r"Could not load '.*gpt2' \(--model_name_or_path\): .*"
                                                r"Check --model_name_or_path"),
            ("--model_name_or_path", "outputs/tiny/tiny_assets/gpt", r"'outputs/tiny/tiny_assets/gpt' looks like a "
                                                                     r"local path, but nothing exists there")):
        message = stops_with(expected, run_tiny, ppo, ppo_assets, tmp_path / "out", setting, str(value))
        assert message.strip().count("\n\n") == 0 and "Traceback" not in message


# ---------------------------------------------------------------------------------------------- models
def test_tiny_tokenizers_are_the_same_in_every_build(ppo_assets):
    """The tiny preset is reproducible only if its tokenizers are: tokenizers' WordPiece trainer broke ties
    differently in each build (5 vocabularies in 5 builds), so the classifier's vocabulary is built by hand."""
    texts = [json.loads(line)["text"] for line in open(os.path.join(ppo_assets, "reviews", "train.jsonl"))]
    for build in (ppo.build_policy_tokenizer, ppo.build_classifier_tokenizer):
        vocabularies = {json.dumps(sorted(build(texts).get_vocab().items())) for _ in range(3)}
        assert len(vocabularies) == 1, build.__name__
    classifier = ppo.build_classifier_tokenizer(texts)
    pieces = classifier.convert_ids_to_tokens(classifier("The film was brilliant, ogue!")["input_ids"])
    assert pieces == ["[CLS]", "the", "film", "was", "brilliant", ",", "o", "##g", "##u", "##e", "[UNK]", "[SEP]"]


def test_pad_token_is_added_and_distinct_from_eos(ppo_assets, tmp_path):
    args = tiny_args(ppo_assets, tmp_path)
    tokenizer = ppo.load_policy_tokenizer(args)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    policy, ref_policy, value_model = ppo.load_policy_models(args, tokenizer)
    assert policy.get_input_embeddings().num_embeddings == len(tokenizer)
    assert value_model.score.out_features == 1
    assert ref_policy is not policy and not any(p.requires_grad for p in ref_policy.parameters())
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref_policy.parameters()))


def test_reward_adapter_matches_calling_the_classifier_directly(ppo_assets, tmp_path):
    from trl.experimental.utils import get_reward

    args = tiny_args(ppo_assets, tmp_path)
    tokenizer = ppo.load_policy_tokenizer(args)
    reward = ppo.load_reward_model(args, tokenizer)
    texts = ["The acting was wonderful and the story was moving.", "Every scene was dull.",
             "To me the film seemed", "Honestly, the ending felt awful, even painful. Skip this one."]
    queries = [tokenizer(t[:12], add_special_tokens=False)["input_ids"] for t in texts]
    responses = [tokenizer(t[12:], add_special_tokens=False)["input_ids"] for t in texts]
    # Lay the batch out as the trainer does: left-padded queries, responses right-padded after an EOS.
    context = max(map(len, queries))
    width = max(map(len, responses)) + 1
    rows = [[tokenizer.pad_token_id] * (context - len(q)) + q + r + [tokenizer.eos_token_id]
            + [tokenizer.pad_token_id] * (width - len(r) - 1) for q, r in zip(queries, responses)]
    _, scores, _ = get_reward(reward, torch.tensor(rows), tokenizer.pad_token_id, context)

    classifier = AutoModelForSequenceClassification.from_pretrained(os.path.join(ppo_assets, "distilbert")).eval()
    classifier_tokenizer = AutoTokenizer.from_pretrained(os.path.join(ppo_assets, "distilbert"))
    decoded = tokenizer.batch_decode([q + r for q, r in zip(queries, responses)])
    assert decoded == texts
    with torch.no_grad():
        batch = classifier_tokenizer(decoded, padding=True, truncation=True, return_tensors="pt",
                                     return_token_type_ids=False)
        direct = classifier(**batch).logits[:, classifier.config.label2id["POSITIVE"]]
    torch.testing.assert_close(scores, direct)
    assert classifier.config.label2id["POSITIVE"] == 0  # tiny classifier puts POSITIVE first, unlike the real one
    assert scores[0] > scores[1] and scores[3] < scores[0]


def test_wrong_reward_models_are_explained(ppo_assets, tmp_path):
    args = tiny_args(ppo_assets, tmp_path, "--positive_label", "LABEL_1")
    tokenizer = ppo.load_policy_tokenizer(args)
    stops_with(r"no label 'LABEL_1'.*NEGATIVE.*POSITIVE.*--positive_label", ppo.load_reward_model, args, tokenizer)
    # A causal language model is no sentiment classifier: following a --positive_label hint would not help.
    args = tiny_args(ppo_assets, tmp_path, "--reward_model_name_or_path", os.path.join(ppo_assets, "gpt2"))
    stops_with(r"is a GPT2LMHeadModel, not a sequence classifier.*--reward_model_name_or_path",
               ppo.load_reward_model, args, tokenizer)


def test_a_model_directory_without_a_tokenizer_is_explained(ppo_assets, tmp_path):
    """transformers 5 builds a tokenizer without ordinary tokens from a directory without tokenizer files; the
    policy's error then blamed --batch_size, and a reward classifier trained on a constant reward. Both are refused
    by name."""
    bare = tmp_path / "bare_gpt2"
    AutoModelForCausalLM.from_pretrained(os.path.join(ppo_assets, "gpt2")).save_pretrained(bare)
    stops_with(rf"'{bare}' \(--model_name_or_path\) holds no tokenizer \(tokenizer.json, vocab files\): save the "
               r"model's tokenizer there too", ppo.load_policy_tokenizer,
               tiny_args(ppo_assets, tmp_path, "--model_name_or_path", bare))
    bare_classifier = tmp_path / "bare_classifier"
    AutoModelForSequenceClassification.from_pretrained(os.path.join(ppo_assets, "distilbert")).save_pretrained(
        bare_classifier)
    args = tiny_args(ppo_assets, tmp_path, "--reward_model_name_or_path", bare_classifier)
    stops_with(r"holds no tokenizer .*--reward_model_name_or_path", ppo.load_reward_model, args,
               ppo.load_policy_tokenizer(args))


# ---------------------------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("setting, value, expected", [
    ("--model_name_or_path", "./no/such/model", r"--model_name_or_path='./no/such/model' looks like a local path"),
    ("--model_name_or_path", "someone/not-downloaded", HUB + r".*Check --model_name_or_path.*--preset tiny"),
    ("--reward_model_name_or_path", "someone/not-downloaded",
     HUB + r".*Check --reward_model_name_or_path"),
    ("--dataset_name", "someone/no-dataset", HUB + r".*Check --dataset_name"),
    ("--batch_size", "31", r"--batch_size \(31\) must be a multiple of --num_mini_batches \(2\)"),
    ("--learning_rate", "0", r"--learning_rate must be positive"),
    ("--response_length", "100", r"exceeds the policy's context of 64 tokens"),
    ("--gradient_accumulation_steps", "2", r"--num_mini_batches and --gradient_accumulation_steps cannot both"),
    ("--total_episodes", "0", r"--total_episodes must be positive"),
    ("--report_to", "mlflow", r"argument --report_to/--report-to: invalid choice: 'mlflow' \(choose from 'wandb', "
                              r"'tensorboard', 'none'\)"),
    ("--device", "tpu", r"argument --device: invalid choice: 'tpu' \(choose from 'auto', 'cuda', 'cpu'\)"),
    ("--compile_ppo_epochs", "fast", r"argument --compile_ppo_epochs/--compile-ppo-epochs: Truthy value expected: "
                                     r"got fast"),
    ("--logging_steps", "0", r"--logging_steps must be positive, got 0"),
    ("--cliprange", "-1", r"--cliprange must be positive, got -1.0"),
    ("--save_steps", "-1", r"--save_steps must be 0 or more, got -1"),
    ("--sample_every", "-2", r"--sample_every must be 0 or more, got -2"),
    ("--lam", "2", r"--lam must be between 0 and 1, got 2.0"),
    ("--gamma", "1.5", r"--gamma must be between 0 and 1, got 1.5"),
    ("--kl_coef", "-0.1", r"--kl_coef must be 0 or more, got -0.1"),
    ("--vf_coef", "-1", r"--vf_coef must be 0 or more, got -1.0"),
    ("--cliprange_value", "0", r"--cliprange_value must be positive, got 0"),
    ("--batch_size", "10000", r"Only \d+ training prompts remain after filtering, fewer than one --batch_size "
                              r"\(10000\)"),
])
def test_bad_settings_stop_with_one_paragraph(ppo_assets, tmp_path, setting, value, expected):
    message = stops_with(expected, run_tiny, ppo, ppo_assets, tmp_path, setting, value)
    assert message.strip().count("\n\n") == 0 and len(message) < 800  # one short paragraph
    assert not os.path.exists(tmp_path / "eval.json")


def test_more_bad_settings_stop_before_training(ppo_assets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    stops_with(r"--output_dir '.*a_file/out' .*Choose a directory you can write to", run_tiny, ppo, ppo_assets,
               blocker / "out")
    stops_with(r"--resume: no checkpoint of this script", run_tiny, ppo, ppo_assets, tmp_path, "--resume")
    if not torch.cuda.is_available():
        stops_with(r"--device cuda was asked for, but PyTorch sees no CUDA device", run_tiny, ppo, ppo_assets,
                   tmp_path, "--device", "cuda")


def test_a_missing_tracker_package_is_named_before_any_model_loads(ppo_assets, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    monkeypatch.setattr(ppo, "load_policy_tokenizer", lambda args: pytest.fail("a model was loaded"))
    stops_with(r"--report_to tensorboard needs the tensorboard package.*pip install -r requirements.txt", run_tiny,
               ppo, ppo_assets, tmp_path, "--report_to", "tensorboard")


def test_the_trainer_config_gets_tf32_only_on_a_gpu_that_has_it(tmp_path, monkeypatch):
    """TRL's PPO trainer ignores bf16; TF32 is the GPU speed it can use. Asking for it without support raises, so
    the script passes None there (PyTorch's default). Checked on the config the script builds for the trainer."""
    built = {}
    monkeypatch.setattr(ppo, "PPOConfig", lambda **kwargs: built.update(kwargs) or kwargs)
    monkeypatch.setattr(ppo.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ppo.torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for available, flag, expected in ((True, "true", True), (True, "false", False), (False, "true", None)):
        monkeypatch.setattr(ppo, "is_torch_tf32_available", lambda: available)
        ppo.build_ppo_config(ppo.parse_args(["--output_dir", str(tmp_path), "--tf32", flag]), eval_size=8)
        assert built["tf32"] is expected and built["use_cpu"] is False
    ppo.build_ppo_config(ppo.parse_args(["--output_dir", str(tmp_path), "--device", "cpu"]), eval_size=8)
    assert built["tf32"] is None and built["use_cpu"] is True and built["bf16"] is False


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_run_from_the_command_line_saves_a_policy_that_reproduces_its_score(ppo_assets, tmp_path):
    """The saved policy, loaded back on its own and scored on the same held-out prompts with the same seed, gives
    the trained reward in eval.json (within 1e-4)."""
    out = tmp_path / "run"
    completed = run_cli(PPO_SCRIPT, tiny_argv(ppo_assets, out, "--total_episodes", "320", "--num_eval_prompts", "16"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Held-out evaluation" in completed.stdout
    assert re.findall(r"(\d+)/(\d+) \[", completed.stderr)[-1] == ("10", "10")  # a progress bar, to its end
    result = json.loads((out / "eval.json").read_text())
    assert result["updates"] == 10 and result["reference"]["num_prompts"] == len(result["trained"]["samples"]) == 16
    assert result["trained"]["kl_to_reference"] > 0 and result["updates_this_run"] == 10
    assert set(result) == {"reference", "trained", "args", "seconds", "train_seconds", "updates", "updates_this_run",
                           "samples_per_second", "peak_gpu_memory_gib"}
    assert result["samples_per_second"] > 0 and (result["peak_gpu_memory_gib"] is None) != torch.cuda.is_available()
    args = tiny_args(ppo_assets, tmp_path / "check", "--num_eval_prompts", "16")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    _, eval_prompts = ppo.load_prompts(args, tokenizer)
    reference = ppo.load_policy_models(args, ppo.load_policy_tokenizer(args))[1]
    policy = AutoModelForCausalLM.from_pretrained(out)
    again = ppo.evaluate(policy, reference, ppo.load_reward_model(args, tokenizer), tokenizer, eval_prompts, args)
    assert again["reward_mean"] == pytest.approx(result["trained"]["reward_mean"], abs=1e-4)
    assert [s["response"] for s in again["samples"]] == [s["response"] for s in result["trained"]["samples"]]
    value_model = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value_model.config.num_labels == 1


def assert_learned_positive_reviews(result: dict, label: str):
    """The learning margins of a tiny run: reward gain, positive share of sentiment words, negative words, variety."""
    reference, trained = result["reference"], result["trained"]
    gain = trained["reward_mean"] - reference["reward_mean"]
    share = {name: sentiment_words(r["samples"], ppo.GOOD) / max(1, sentiment_words(r["samples"], ppo.GOOD)
                                                                 + sentiment_words(r["samples"], ppo.BAD))
             for name, r in (("reference", reference), ("trained", trained))}
    distinct = len({s["response"] for s in trained["samples"]}) / len(trained["samples"])
    print(f"{label}: reward {reference['reward_mean']:.2f} -> {trained['reward_mean']:.2f}, positive share "
          f"{share['reference']:.2f} -> {share['trained']:.2f}, negative words "
          f"{sentiment_words(reference['samples'], ppo.BAD)} -> {sentiment_words(trained['samples'], ppo.BAD)}, "
          f"distinct {distinct:.2f}")
    assert gain > 1.5, f"{label}: reward gain {gain:.2f}"
    assert share["trained"] > share["reference"] + 0.2
    assert sentiment_words(trained["samples"], ppo.BAD) < sentiment_words(reference["samples"], ppo.BAD) / 2
    assert distinct >= 0.75  # not collapsed to a few responses


@pytest.fixture(scope="module")
def ppo_seed0_run(ppo_assets, tmp_path_factory):
    """The tiny preset as it comes (seed 0), run once for this module: the learning test's first seed, and the
    one-process reference score the two-process test compares with (the reference policy is scored after training
    on the same held-out prompts with the seed's own sampling stream, so how long training ran does not change it)."""
    return run_tiny(ppo, ppo_assets, tmp_path_factory.mktemp("ppo_seed0"))


@pytest.mark.slow
def test_ppo_learns_to_write_positive_reviews_across_seeds(ppo_assets, ppo_seed0_run, tmp_path):
    """The classifier's reward rises by more than 1.5 logits, and, counted without the classifier, the samples carry
    more positive and fewer negative words of the tiny review builder and stay varied. Measured on 2 CPU cores
    (reference -> trained): seed 0 reward -1.90 -> 3.47, positive share of sentiment words 0.56 -> 0.89, negative
    words 60 -> 11, 62 of 64 responses distinct; seed 1 -2.49 -> 3.68, 0.40 -> 0.82, 81 -> 11, 58 of 64. A reward
    pointed at the wrong label raises the classifier's own score just as well; these word counts catch it."""
    for seed in (0, 1):
        result = ppo_seed0_run if seed == 0 else run_tiny(ppo, ppo_assets, tmp_path / f"seed{seed}", "--seed", seed)
        assert_learned_positive_reviews(result, f"seed {seed}")


def test_bf16_autocast_reaches_the_accelerator_trl_builds_and_only_that_one(tmp_path, monkeypatch):
    """TRL's PPO trainer builds its Accelerator without a mixed precision, so accelerate reads it from the
    environment: the script sets it while the trainer is built (where --bf16_autocast applies) and restores it."""
    seen = []

    def building(self, *args, **kwargs):
        seen.append(os.environ.get("ACCELERATE_MIXED_PRECISION"))
        raise InterruptedError  # the trainer itself is not needed here

    monkeypatch.setattr(ppo.PPOTrainer, "__init__", building)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(ppo, "on_gpu", lambda args: True)  # a GPU with bf16, as far as these settings go
    monkeypatch.setattr(ppo.torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for wanted in ("true", "false"):
        with pytest.raises(InterruptedError):
            ppo.SentimentPPOTrainer(settings=ppo.parse_args(["--bf16_autocast", wanted]), checkpoint=None,
                                    stop=ppo.StopRequest())
        assert "ACCELERATE_MIXED_PRECISION" not in os.environ
    assert seen == ["bf16", None]


def rollout_generation_config(response_length: int):
    """The generation config TRL's PPO trainer builds for its rollouts."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=response_length, temperature=1.0 + 1e-7, top_k=0, top_p=1.0,
                            do_sample=True)


def caches_generate_gets(monkeypatch) -> tuple:
    """(the cache each `generate` call decodes into, the shape of each static cache layer allocation), from now on."""
    import transformers.generation.utils as generation
    from transformers.cache_utils import StaticLayer

    caches, allocations = [], []
    compilable = generation.GenerationMixin._valid_auto_compile_criteria  # asked once per call, with the cache
    allocate = StaticLayer.lazy_initialization

    def asked(self, model_kwargs, generation_config):
        caches.append(model_kwargs.get("cache"))
        return compilable(self, model_kwargs, generation_config)

    def allocating(self, key_states, value_states, *args, **kwargs):
        allocations.append(tuple(key_states.shape))
        return allocate(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(generation.GenerationMixin, "_valid_auto_compile_criteria", asked)
    monkeypatch.setattr(StaticLayer, "lazy_initialization", allocating)
    return caches, allocations


def test_rollouts_decode_into_one_static_cache_allocated_once(ppo_assets, tmp_path, monkeypatch):
    """transformers 5 allocates a new static cache on every `generate` call, and on a GPU the compiled decode's CUDA
    graphs record again whenever a cache tensor's address changes, as it can between rollouts (the H200 rollout
    gained 0.036 s per update of the 0.13 s a compiled decode gains in a plain loop). While the wrapper is open,
    every rollout-shaped call (TRL's own batch_generation, 8 prompts of width 8, 16 new tokens) decodes into the one
    cache, whose tensors are allocated once, with the tokens and logits of a dynamic-cache rollout (measured on 2
    CPU cores: the same tokens, logits within 3.8e-6); calls of other shapes (sample tables, the evaluation), which
    would compile again, keep the dynamic one. (The GPU layout only: a CPU run decodes with the dynamic cache.)"""
    from transformers.cache_utils import DynamicCache, StaticCache
    from trl.experimental.ppo.ppo_trainer import batch_generation

    args = tiny_args(ppo_assets, tmp_path)
    tokenizer = ppo.load_policy_tokenizer(args)
    policy = ppo.load_policy_models(args, tokenizer)[0].eval()
    prompts = torch.randint(1, 500, (8, 8), generator=torch.Generator().manual_seed(0))
    prompts[:3, :4] = tokenizer.pad_token_id  # left padding, as the script's collator pads on a GPU
    config = rollout_generation_config(16)

    def rollouts(batch, generation_config) -> list:
        torch.manual_seed(0)
        return [batch_generation(policy, batch, 8, tokenizer.pad_token_id, generation_config) for _ in range(3)]

    caches, allocations = caches_generate_gets(monkeypatch)
    dynamic = rollouts(prompts, config)
    assert len(caches) == 3 and all(type(cache) is DynamicCache for cache in caches)
    caches.clear()
    cache = StaticCache(config=policy.config, max_cache_len=8 + 16)
    with ppo.rollouts_decode_into(cache, policy, batch_size=8, prompt_width=8, response_length=16):
        static = rollouts(prompts, config)
        assert len(caches) == 3 and all(c is cache for c in caches)  # one cache for every rollout
        caches.clear()
        rollouts(prompts[:4], config)  # a sample table's batch
        rollouts(prompts, rollout_generation_config(8))  # other lengths
        assert len(caches) == 6 and all(type(c) is DynamicCache for c in caches)
    layers = AutoConfig.from_pretrained(f"{ppo_assets}/gpt2").n_layer
    assert len(allocations) == layers and allocations[0][0] == 8  # once per layer, for 8 prompts
    for (static_ids, static_logits), (dynamic_ids, dynamic_logits) in zip(static, dynamic):
        assert torch.equal(static_ids, dynamic_ids)
        torch.testing.assert_close(static_logits, dynamic_logits, rtol=0, atol=1e-4)


# Five rollouts of 8 prompts: about a third of them have no prompt of the longest length (8 tokens), and would fall
# back to a dynamic cache unless padded; sample tables take 4 at a time (another shape).
ROLLOUTS_OF_8 = ["--batch_size", "8", "--num_mini_batches", "1", "--total_episodes", "40", "--num_eval_prompts", "4"]


def test_the_trainer_decodes_every_rollout_into_its_one_static_cache_on_a_gpu(ppo_assets, tmp_path, monkeypatch):
    """The trainer's side of the static cache, run on a CPU as if it were a GPU (transformers still decodes
    uncompiled there, and nothing is compiled: --compile_ppo_epochs false): prompts padded to --prompt_max_tokens,
    and each rollout batch's `generate` call made with the shape the wrapper waits for, so that all five rollouts
    decode into one cache allocated once; sample tables and the evaluation keep the dynamic one."""
    from transformers.cache_utils import DynamicCache, StaticCache

    monkeypatch.setattr(ppo, "on_gpu", lambda args: True)
    caches, allocations = caches_generate_gets(monkeypatch)
    run_tiny(ppo, ppo_assets, tmp_path, *ROLLOUTS_OF_8, "--sample_every", "2", "--static_cache_generation", "true",
             "--compile_ppo_epochs", "false", "--bf16_autocast", "false")
    static = [cache for cache in caches if isinstance(cache, StaticCache)]
    assert len(static) == 5 and len({id(cache) for cache in static}) == 1
    layers = AutoConfig.from_pretrained(f"{ppo_assets}/gpt2").n_layer
    assert len(allocations) == layers and allocations[0][0] == 8
    dynamic = [cache for cache in caches if not isinstance(cache, StaticCache)]
    print(f"{len(static)} calls into one static cache, {len(dynamic)} with a dynamic one")
    assert len(dynamic) >= 3 and all(type(cache) is DynamicCache for cache in dynamic)


def test_the_rollout_cache_wrapper_restores_what_it_found(ppo_assets):
    """On exit the model has the class's own `generate` back, and its default cache_implementation."""
    from transformers.cache_utils import StaticCache

    policy = AutoModelForCausalLM.from_pretrained(f"{ppo_assets}/gpt2")
    policy.generation_config.cache_implementation = "dynamic"
    cache = StaticCache(config=policy.config, max_cache_len=24)
    with ppo.rollouts_decode_into(cache, policy, batch_size=4, prompt_width=8, response_length=16):
        assert "generate" in vars(policy) and policy.generation_config.cache_implementation is None
    assert "generate" not in vars(policy) and policy.generation_config.cache_implementation == "dynamic"


def policy_and_value(assets):
    """TRL's wrapper of the tiny policy and value model as the script loads them, in training mode without dropout,
    as TRL runs it."""
    from trl.experimental.ppo.ppo_trainer import PolicyAndValueWrapper
    from trl.trainer.utils import disable_dropout_in_model

    args = ppo.Args(model_name_or_path=f"{assets}/gpt2")
    tokenizer = ppo.load_policy_tokenizer(args)
    torch.manual_seed(0)  # the value head's initial weights
    policy, _, value = ppo.load_policy_models(args, tokenizer)
    wrapper = PolicyAndValueWrapper(policy, value).train()
    disable_dropout_in_model(wrapper)
    return wrapper


def left_padded_batch() -> torch.Tensor:
    """4 sequences of 12 token ids, the first two left-padded with 3 pad ids (0), as TRL's batches are."""
    query_responses = torch.randint(1, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    query_responses[:2, :3] = 0
    return query_responses


def ppo_pass_results(model, query_responses) -> tuple:
    """The pass the PPO epochs make (TRL's forward, pad id 0), then backward through a loss over every logit and
    value: the logits, the values and the gradients."""
    output, values = ppo.trl_ppo_module.forward(model, query_responses, 0)
    (output.logits.float().logsumexp(-1).mean() + values.square().mean()).backward()
    gradients = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return output.logits.detach(), values.detach(), gradients


def largest_difference(results: tuple, others: tuple) -> float:
    """The largest absolute difference between two ppo_pass_results: logits, values and every gradient."""
    return max((a - b).abs().max().item() for a, b in zip([*results[:2], *results[2]], [*others[:2], *others[2]]))


@pytest.mark.slow
def test_compiled_ppo_epochs_trace_into_one_graph_after_one_eager_call(ppo_assets):
    """transformers installs its hidden-state hooks on a model's first call, under a lock torch.compile cannot
    trace: compiling TRL's policy-and-value wrapper as it comes breaks the graph there (measured: 10 breaks, 4
    graphs). After the script's one eager call, forward and backward compile into one graph, and its outputs and
    gradients match eager ones (measured: largest difference 2.9e-6 on 2 CPU cores)."""
    from torch._dynamo.utils import counters

    query_responses = left_padded_batch()

    def compiled_counts(compile):
        torch._dynamo.reset()
        counters.clear()
        model = policy_and_value(ppo_assets)
        compile(model)
        result = ppo_pass_results(model, query_responses)
        return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"], result

    breaks, graphs, _ = compiled_counts(lambda model: setattr(model, "forward", torch.compile(model.forward)))
    print(f"compiled as it comes: {breaks} graph breaks, {graphs} graphs")
    assert breaks > 0 and graphs > 1  # the bug: if this fails, transformers fixed it and the eager call can go
    breaks, graphs, compiled = compiled_counts(lambda model: ppo.compile_ppo_epochs(model, mode="default"))
    assert (breaks, graphs) == (0, 1)
    eager = ppo_pass_results(policy_and_value(ppo_assets), query_responses)
    torch._dynamo.reset()
    largest = largest_difference(compiled, eager)
    print(f"largest difference to eager: {largest:.2e}")
    assert len(compiled[2]) == len(eager[2]) > 0 and largest < 1e-4


@pytest.mark.slow
def test_trls_per_update_memory_freeing_is_skipped(ppo_assets, tmp_path, monkeypatch):
    """TRL's loop runs gc.collect() twice per update (measured: 0.22 s each on 2 CPU cores, two thirds of a tiny
    update) and empties the CUDA cache about ten times; the script's trainer skips both while it trains."""
    import gc

    real_collect, callers = gc.collect, []

    def counted_collect(*args):
        callers.append(sys._getframe(1).f_globals.get("__name__"))
        return real_collect(*args)

    monkeypatch.setattr(gc, "collect", counted_collect)
    run_tiny(ppo, ppo_assets, tmp_path / "run", "--total_episodes", "160", "--num_eval_prompts", "8")
    assert ppo.trl_ppo_module.__name__ not in callers
    assert ppo.trl_ppo_module.gc is gc and ppo.trl_ppo_module.empty_cache.__module__ == "trl.experimental.utils"


class CountedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen operations run under it, by name (on a GPU each is about one kernel launch)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_the_models_are_loaded_so_that_trls_forward_builds_no_kv_cache(ppo_assets):
    """GPT-2's config turns its KV cache on, so TRL's `forward` (the PPO epochs' policy-and-value pass, the rollout's
    reference pass) would copy every layer's keys and values into a cache that nothing reads and that stays alive
    through the loss and backward. The script loads policy and value model with it off: TRL's pass on them builds
    none, with the same logits, values and gradients as with it, and fewer operations (by this counter, at GPT-2
    size and 8 x 24 tokens: 3,021 -> 2,829 ATen operations for a forward and backward)."""
    assert AutoConfig.from_pretrained(f"{ppo_assets}/gpt2").use_cache  # as GPT-2's config comes
    query_responses = left_padded_batch()
    results = {}
    for name in ("as the config comes", "as the script loads it"):
        model = policy_and_value(ppo_assets)
        if name == "as the config comes":
            model.policy.config.use_cache = model.value_model.config.use_cache = True
        with CountedOps() as ops:
            output, values = ppo.trl_ppo_module.forward(model, query_responses, 0)
            (output.logits.logsumexp(-1).mean() + values.square().mean()).backward()
        results[name] = (output, values, [p.grad for p in model.parameters()], ops.counts)
    (cached, cached_values, cached_grads, cached_ops), (output, values, grads, ops) = results.values()
    layers = AutoConfig.from_pretrained(f"{ppo_assets}/gpt2").n_layer
    assert type(cached.past_key_values).__name__ == "DynamicCache"  # what the setting saves
    assert cached_ops["cat"] - ops.get("cat", 0) == 2 * 2 * layers  # keys and values, policy and value model
    assert output.past_key_values is None
    assert torch.equal(output.logits, cached.logits) and torch.equal(values, cached_values)
    assert all(torch.equal(a, b) for a, b in zip(grads, cached_grads))


# ---------------------------------------------------------------------------------------------- nothing lost
def fingerprint(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_finished_or_unfinished_run_is_never_overwritten_silently(ppo_assets, tmp_path):
    out = tmp_path / "run"
    run_tiny(ppo, ppo_assets, out, "--total_episodes", "128", "--num_eval_prompts", "8", "--save_steps", "2")
    before = fingerprint(out)
    message = stops_with(r"holds a finished run .* Nothing was changed. Choose another --output_dir, or pass "
                         r"--overwrite_output_dir", run_tiny, ppo, ppo_assets, out,
                         "--total_episodes", "64", "--num_eval_prompts", "8")
    assert fingerprint(out) == before and "eval.json" in before and "model.safetensors" in before
    assert "--resume" not in message  # it would train again from checkpoint-2 over the finished model
    stops_with(r"holds a finished run .*resuming from one of its checkpoints would train again over it. Nothing was "
               r"changed.* --overwrite_output_dir", run_tiny,
               ppo, ppo_assets, out, "--total_episodes", "128", "--num_eval_prompts", "8", "--resume")
    assert fingerprint(out) == before
    os.remove(out / "eval.json")  # as if stopped while evaluating: the trained model is saved, and stays
    for extra in ([], ["--resume"]):
        stops_with(r"holds a finished run \(model.safetensors\)[:;] .* Nothing was "
                   r"changed", run_tiny, ppo, ppo_assets, out, "--total_episodes", "128", "--num_eval_prompts", "8",
                   *extra)
        assert fingerprint(out) == {name: digest for name, digest in before.items() if name != "eval.json"}
    as_if_interrupted_after_its_checkpoints(out)
    stops_with(r"holds checkpoints of an unfinished run \(the latest: checkpoint-4\).*continue it with --resume",
               run_tiny, ppo, ppo_assets, out, "--total_episodes", "64", "--num_eval_prompts", "8")
    # Resumed with other settings it would end where neither run would; tracking and saving settings may change.
    before = fingerprint(out)
    message = stops_with(r"--resume .*checkpoint-4': the run that wrote it was trained with other settings "
                         r"\(--batch_size 32 -> 16; --kl_coef 0.1 -> 0.3\).* Nothing was loaded", run_tiny, ppo,
                         ppo_assets, out, "--total_episodes", "128", "--num_eval_prompts", "8", "--resume",
                         "--batch_size", "16", "--kl_coef", "0.3", "--logging_steps", "3", "--save_steps", "5")
    assert "logging_steps" not in message and "save_steps" not in message and fingerprint(out) == before
    result = run_tiny(ppo, ppo_assets, out, "--total_episodes", "64", "--num_eval_prompts", "8",
                      "--overwrite_output_dir", "--save_steps", "0")
    assert result["updates"] == 2 and not list(out.glob("checkpoint-*"))  # the old checkpoints went, by request
    assert len(message) < 800


def test_a_crash_while_saving_a_checkpoint_leaves_none_that_looks_complete(ppo_assets, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def crash_half_way(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        raise MemoryError  # the process dies after the weights, before the counters (a full disk: test_edges.py)

    monkeypatch.setattr(Accelerator, "save_state", crash_half_way)
    with pytest.raises(MemoryError):
        run_tiny(ppo, ppo_assets, tmp_path, "--total_episodes", "64", "--save_steps", "1", "--num_eval_prompts", "8")
    assert not list(tmp_path.glob("checkpoint-*")) and (tmp_path / ".saving" / "checkpoint-1").is_dir()
    monkeypatch.undo()
    stops_with(r"--resume: no checkpoint of this script", run_tiny, ppo, ppo_assets, tmp_path, "--resume")


# ---------------------------------------------------------------------------------------------- resume, interrupts
def test_a_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(ppo_assets, tmp_path, monkeypatch):
    """TRL 1.12's PPO trainer cannot resume; the script checkpoints policy, value model, optimizer, schedule, RNG,
    counters and data position. Tolerance: equal within 1e-6 (measured: bit-identical on CPU). Its episodes per
    second count this run's episodes only (TRL's counted the resumed run's too: 2x too high at update 8 here)."""
    from safetensors.torch import load_file

    trl_eps, logged = [None], []  # TRL's figure of the call in progress; (TRL's, the logs the script forwarded)
    script_log = ppo.SentimentPPOTrainer.log
    monkeypatch.setattr(ppo.PPOTrainer, "log", lambda self, logs, *a, **k: logged.append((trl_eps[0], dict(logs))))
    monkeypatch.setattr(ppo.SentimentPPOTrainer, "log", lambda self, logs, *a, **k: (
        trl_eps.__setitem__(0, logs.get("eps")), script_log(self, logs, *a, **k)))

    common = ["--total_episodes", "256", "--save_steps", "4", "--num_eval_prompts", "8",
              "--sample_every", "3"]  # sample tables on: they must not shift the RNG
    straight = tmp_path / "straight"
    run_tiny(ppo, ppo_assets, straight, *common)
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    crashed = tmp_path / "crashed"  # as if the machine died right after the checkpoint of update 4
    shutil.copytree(straight / "checkpoint-4", crashed / "checkpoint-4")
    logged.clear()
    result = run_tiny(ppo, ppo_assets, crashed, *common, "--resume")
    assert result["updates"] == 8 and result["updates_this_run"] == 4
    trl, logs = next((trl, logs) for trl, logs in logged if "eps" in logs)
    episode = logs["episode"]  # 128 of them done by the run resumed, at checkpoint-4
    assert episode > 128 and 0 < logs["eps"] <= trl * (episode - 128) / episode + 1
    assert json.loads((crashed / "checkpoint-8" / "counters.json").read_text()) == {"global_step": 8, "episode": 256}
    for name in ("model.safetensors", "value_model/model.safetensors"):
        expected, resumed = load_file(straight / name), load_file(crashed / name)
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)


def test_resuming_from_an_earlier_checkpoint_replaces_the_later_ones(ppo_assets, tmp_path):
    """Continuing from checkpoint-4 of a run that went on to checkpoint-8 writes checkpoints 6 and 8 again (the
    rename used to fail on the existing folders) and ends with the same weights (within 1e-6). The run had finished,
    so replacing its model takes --overwrite_output_dir (without it: test_a_finished_or_unfinished_run_...)."""
    from safetensors.torch import load_file

    common = ["--total_episodes", "256", "--save_steps", "2", "--num_eval_prompts", "8"]
    run_tiny(ppo, ppo_assets, tmp_path, *common)
    first = load_file(tmp_path / "model.safetensors")
    (tmp_path / "checkpoint-8" / "stale-marker").write_text("from the first run")
    result = run_tiny(ppo, ppo_assets, tmp_path, *common, "--resume", tmp_path / "checkpoint-4",
                      "--overwrite_output_dir")
    assert result["updates_this_run"] == 4 and not (tmp_path / "checkpoint-8" / "stale-marker").exists()
    again = load_file(tmp_path / "model.safetensors")
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_every_process_stops_at_the_same_step_when_one_is_signalled(tmp_path):
    """A launcher signals its processes one by one: the process that saw nothing yet takes the other's signal at
    the same step instead of running on (and hanging the others in the checkpoint's barriers). Two CPU processes
    joined as accelerate joins them: a step where neither was signalled goes on in both; a step where process 0 is
    signalled right after it answered goes on in both too (it used to stop process 0 alone: a 30 s hang, then a
    traceback); at the next step both stop, process 1 as by SIGTERM."""
    import torch.multiprocessing

    torch.multiprocessing.spawn(agree_on_stop, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == ["False False SIGINT", "False False SIGTERM"]


def agree_on_stop(rank: int, directory: str, port: int):
    from accelerate import Accelerator

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    accelerator = Accelerator(cpu=True)  # joins the two processes over gloo
    assert accelerator.num_processes == 2
    stop = ppo.StopRequest()
    going_on = stop.requested(accelerator)
    answer = accelerator.check_trigger

    def answer_then_signalled():  # the signal handler runs on process 0 just after the processes agreed
        agreed = answer()
        stop.signal_name = "SIGINT" if rank == 0 else None
        return agreed

    accelerator.check_trigger = answer_then_signalled
    late = stop.requested(accelerator)
    accelerator.check_trigger = answer
    stopping = stop.requested(accelerator)
    with open(os.path.join(directory, f"rank{rank}"), "w") as handle:
        handle.write(f"{going_on} {late} {stop.signal_name if stopping else None}")
    accelerator.end_training()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_prints_how_to_resume_and_exits_143(ppo_assets, tmp_path):
    out = tmp_path / "run"
    code, output, _ = run_then_signal(PPO_SCRIPT, tiny_argv(ppo_assets, out, "--total_episodes", "100000",
                                                            "--save_steps", "0"), "Training:")
    assert code == 143, output[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = json.loads((checkpoints[0] / "counters.json").read_text())["global_step"]
    assert 0 < step < 3125
    assert f"Stopped by SIGTERM after update {step} of 3125" in output
    assert f"--resume {checkpoints[0]}" in output and "Traceback" not in output
    assert not (out / "eval.json").exists()


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_exit_130_and_no_traceback(ppo_assets, tmp_path):
    """The second Ctrl-C is sent once the first is acknowledged, during updates of 512 prompts (about 2 s each on 2
    CPU cores), so that it lands inside the update the first one lets finish."""
    out = tmp_path / "run"
    code, output, _ = run_then_signal(PPO_SCRIPT, tiny_argv(ppo_assets, out, "--total_episodes", "100000",
                                                            "--batch_size", "512", "--save_steps", "0"),
                                      "Training:", sig=signal.SIGINT, again_on_line="SIGINT: finishing")
    assert code == 130, output[-3000:]
    assert "SIGINT: finishing the current step, then saving a checkpoint (again to stop at once)" in output
    assert "SIGINT: stopped at once. This step's checkpoint was not saved" in output
    assert "Traceback" not in output and not list(out.glob("checkpoint-*"))


def test_ctrl_c_during_the_final_evaluation_keeps_the_saved_model_and_exits_130(ppo_assets, tmp_path):
    out = tmp_path / "run"
    code, output, _ = run_then_signal(PPO_SCRIPT, tiny_argv(ppo_assets, out, "--total_episodes", "64",
                                                            "--num_eval_prompts", "200", "--eval_batch_size", "1"),
                                      "Evaluating", delay=0.5, sig=signal.SIGINT)
    assert code == 130, output[-3000:]
    assert "SIGINT: stopped at once. The trained model is saved in --output_dir" in output
    assert "Traceback" not in output and "checkpoint" not in output.split("Evaluating", 1)[1]
    assert (out / "model.safetensors").exists() and not (out / "eval.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt2"
    before = fingerprint(out)  # a rerun into it used to train and replace the model without a word
    stops_with(r"holds a finished run \(model.safetensors\)", run_tiny, ppo,
               ppo_assets, out, "--total_episodes", "32")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------------------- trackers
def test_wandb_goes_to_the_project_setting_and_offline_without_credentials(no_wandb_credentials, capsys):
    args = ppo.parse_args(["--report_to", "wandb", "--wandb_entity", "my-team"])
    capsys.readouterr()  # what parsing printed (without a GPU, one line)
    ppo.prepare_tracking(args)
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_PROJECT"] == "ppo_gpt2_imdb"
    assert os.environ["WANDB_ENTITY"] == "my-team"
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "offline" in printed[0]
    for name, value in (("WANDB_MODE", "online"), ("WANDB_API_KEY", "x" * 40)):
        os.environ[name] = value  # undone by the fixture
    ppo.prepare_tracking(ppo.parse_args(["--report_to", "wandb", "--wandb_project", "other"]))
    assert os.environ["WANDB_MODE"] == "online" and os.environ["WANDB_PROJECT"] == "other"  # the user's choices


@pytest.mark.slow
def test_wandb_offline_run_records_sample_tables_and_closes_cleanly(ppo_assets, tmp_path):
    completed = run_cli(PPO_SCRIPT, [*tiny_argv(ppo_assets, tmp_path / "run", "--total_episodes", "320",
                                                "--sample_every", "5", "--logging_steps", "1",
                                                "--num_eval_prompts", "16"), "--report_to", "wandb",
                                     "--wandb_project", "tiny-ppo-project"],
                        cwd=str(tmp_path), WANDB_MODE="offline")
    assert completed.returncode == 0, completed.stderr[-3000:]
    logged = completed.stdout + completed.stderr
    assert "objective/scores" in logged
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    tables = sorted(p.name.split("_")[0] for p in (run / "files" / "media" / "table").rglob("*.table.json"))
    assert tables == ["completions", "completions", "samples"]  # updates 1 and 6 of 10, then the evaluation
    assert "ERROR" not in (run / "logs" / "debug.log").read_text()
    assert b"tiny-ppo-project" in next(run.glob("run-*.wandb")).read_bytes()  # the run's project


@pytest.mark.slow
def test_tensorboard_run_writes_readable_scalars_every_logging_steps_updates_and_at_the_last(ppo_assets, tmp_path):
    """TRL 1.12's PPO loop logs every update whatever logging_steps says; the script thins it out as the setting
    says, and always logs the last update."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_tiny(ppo, ppo_assets, out, "--total_episodes", "160", "--num_eval_prompts", "8", "--logging_steps", "2",
             "--report_to", "tensorboard")
    (events,) = {path.parent for path in out.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events)).Reload()
    assert "train/objective/kl" in accumulator.Tags()["scalars"]
    assert [event.step for event in accumulator.Scalars("train/objective/scores")] == [2, 4, 5]  # 5 updates


# ---------------------------------------------------------------------------------------------- two processes
DDP_CHILD = """
import json, sys
import torch
import torch.distributed as dist
from accelerate import PartialState
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
import ppo_gpt2_imdb as ppo
from test_ppo import left_padded_batch, policy_and_value
from torch._dynamo.utils import counters

state = PartialState(cpu=True)  # the launcher's process group (gloo on CPUs)
results, eager = {}, None
for how in ("eager", "compiled", "compiled, called around DDP"):
    torch._dynamo.reset()
    counters.clear()
    wrapper = policy_and_value(sys.argv[1])
    ddp = torch.nn.parallel.DistributedDataParallel(wrapper)  # as accelerate wraps TRL's model
    if how != "eager":
        ppo.compile_ppo_epochs(wrapper, mode="default")
    batch = left_padded_batch()
    batch[:, 3:] = (batch[:, 3:] + 7 * state.process_index) % 499 + 1  # each process its own tokens
    output, values = ppo.trl_ppo_module.forward(wrapper if "around" in how else ddp, batch, 0)
    (output.logits.float().logsumexp(-1).mean() + values.square().mean()).backward()
    gradients = torch.cat([p.grad.flatten() for p in wrapper.parameters() if p.grad is not None])
    gathered = [torch.empty_like(gradients) for _ in range(state.num_processes)]
    dist.all_gather(gathered, gradients)
    eager = gradients if eager is None else eager
    results[how] = {"between_processes": (gathered[0] - gathered[1]).abs().max().item(),
                    "to_eager": (gradients - eager).abs().max().item(),
                    "graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}
if state.is_main_process:
    print(json.dumps(results))
"""


@pytest.mark.slow
def test_the_compiled_ppo_pass_inside_ddp_all_reduces_its_gradients_as_eager_does(ppo_assets, tmp_path):
    """With several processes accelerate wraps TRL's policy-and-value wrapper in DDP, and the script compiles the
    wrapper's forward inside it; DDP all-reduces only the gradients of a pass that went through its own forward.
    Two CPU processes, each on its own tokens, one PPO pass forward and backward: compiled, the gradients are equal
    in both processes and within 1e-4 of eager DDP's (measured: 0.0 between processes, 1.0e-6 to eager), in one
    graph. The control (the compiled wrapper called around DDP) shows the check sees unsynced gradients (measured:
    0.82 apart). CUDA graphs inside DDP (the GPU defaults) are not covered: a CPU records none."""
    child = tmp_path / "ddp_child.py"
    child.write_text(DDP_CHILD)
    launched = accelerate_launch(str(child), [os.path.abspath(ppo_assets), REPO], timeout=600)
    assert launched.returncode == 0, launched.stderr[-4000:]
    results = json.loads(launched.stdout.strip().splitlines()[-1])
    print(results)
    assert results["eager"]["between_processes"] == 0.0
    compiled = results["compiled"]
    assert compiled["between_processes"] == 0.0 and compiled["to_eager"] < 1e-4
    assert (compiled["graphs"], compiled["breaks"]) == (1, 0)
    assert results["compiled, called around DDP"]["between_processes"] > 0.1


@pytest.mark.slow
def test_two_processes_learn_speak_once_and_resume_after_ctrl_c_on_two_processes_only(ppo_assets, ppo_seed0_run,
                                                                                      tmp_path):
    """accelerate launch --num_processes 2 with 16 prompts per process is the same update size as one process with
    32. Sampling streams differ per process (TRL seeds each rank apart), so the check is statistical: the same
    held-out reference score as one process, and the trained policy beats it by the learning test's margin.
    Ctrl-C (SIGINT to the launcher and both processes, as a terminal sends it): one notice and one resume command,
    which launches two processes again and ends with the weights of the uninterrupted run (within 1e-6); the same
    resume on one process is refused, naming both numbers."""
    common = ["--total_episodes", "1280", "--save_steps", "20"]
    single = ppo_seed0_run  # one process, the same seed and held-out prompts
    launched = accelerate_launch(PPO_SCRIPT, tiny_argv(ppo_assets, tmp_path / "two", *common, "--batch_size", "16"))
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stdout.count("Training: 40 PPO updates of 16 prompts per process on 2 x cpu") == 1
    assert launched.stdout.count("Saved the policy, tokenizer and eval.json") == 1  # by the main process only
    double = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert double["reference"]["reward_mean"] == single["reference"]["reward_mean"]
    assert double["trained"]["reward_mean"] - double["reference"]["reward_mean"] > 1.5
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    assert len(list((tmp_path / "two" / "checkpoint-40").glob("random_states_*.pkl"))) == 2  # every rank's RNG
    # TRL 1.12's save_model fails with several processes (it saves the DDP wrapper); the script saves the policy.
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "two").config.model_type == "gpt2"

    from safetensors.torch import load_file

    stopped = tmp_path / "stopped"
    code, output = launch_then_interrupt(PPO_SCRIPT, tiny_argv(ppo_assets, stopped, *common, "--batch_size", "16"),
                                         after=r" ([5-9]|1[0-5])/40 \[")
    assert code != 0 and output.count("SIGINT: finishing the current step") == 1, output[-3000:]
    assert output.count("Resume with:") == 1 and "it ran on 2 processes" in output
    command = output.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith("accelerate launch --multi_gpu --num_processes 2 --mixed_precision no ppo_gpt2_imdb.py")
    stops_with(r"--num_processes 2 -> 1", ppo.main, ppo.parse_args(shlex.split(command)[8:]))  # one process
    resumed = run_printed_launch(command)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    trained = json.loads((stopped / "eval.json").read_text())["trained"]
    assert trained["reward_mean"] == pytest.approx(double["trained"]["reward_mean"], abs=1e-4)
    expected, got = load_file(tmp_path / "two" / "model.safetensors"), load_file(stopped / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
