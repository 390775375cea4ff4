"""Safety net for the lean-recipes refactor: resume settings, the reward's label, DPO overwrite protection and the
settings that reach TRL and peft, each checked against a table written here (never read from the scripts)."""
import json
import os
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import dpo_llama2_stackexchange as dpo
import ppo_gpt2_imdb as ppo
from helpers import as_if_interrupted_after_its_checkpoints, run_tiny, stops_with, tiny_argv

PPO_RUN = ["--total_episodes", "128", "--num_eval_prompts", "8", "--save_steps", "2"]
DPO_RUN = ["--max_steps", "4", "--eval_steps", "0", "--num_eval_generations", "0", "--max_eval_samples", "8"]


def fingerprint(directory) -> dict:
    """Every file under `directory`, recursively: relative path -> bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def plain_args(module, output_dir, *extra):
    """Settings as parsed from the command line, without a preset or assets: enough for the checks below the CLI."""
    return module.parse_args(["--output_dir", str(output_dir), "--report_to", "none", "--device", "cpu",
                              *map(str, extra)])


def refusal(call, *args) -> str:
    """`call(*args)` must stop; its message unwrapped (whitespace folded, and a line broken after a hyphen, as in
    "meta-" / "llama", joined again)."""
    with pytest.raises(SystemExit) as stopped:
        call(*args)
    return re.sub(r"(?<=\w)- (?=\w)", "-", " ".join(str(stopped.value).split()))


def refused_settings(message: str) -> list:
    """The names in a resume refusal's `--NAME old -> new` list."""
    return re.findall(r"--(\w+) \S+ -> ", message)


# ---------------------------------------------------------------------------------------------- resume settings
# Settings that shape training's course, each with a value other than its default. Written out here, not read from
# RESUME_MUST_MATCH: a setting dropped from the script's list fails its case.
PPO_MUST_MATCH = [
    ("learning_rate", "1e-4"), ("batch_size", "64"), ("seed", "1"), ("model_name_or_path", "gpt2-medium"),
    ("kl_coef", "0.05"), ("reward_model_name_or_path", "other/classifier"),
    ("positive_label", "NEGATIVE"), ("dataset_name", "other/reviews"), ("dataset_train_split", "unsupervised"),
    ("text_column", "review"), ("num_mini_batches", "2"), ("gradient_accumulation_steps", "2"),
    ("num_ppo_epochs", "2"), ("total_episodes", "1000"), ("cliprange", "0.1"), ("cliprange_value", "0.3"),
    ("vf_coef", "0.5"), ("gamma", "0.99"), ("lam", "0.9"), ("response_length", "24"), ("temperature", "0.7"),
    ("prompt_min_tokens", "3"), ("prompt_max_tokens", "10"), ("min_review_chars", "100"),
]
DPO_MUST_MATCH = [
    ("learning_rate", "1e-4"), ("per_device_train_batch_size", "2"), ("seed", "1"),
    ("model_name_or_path", "meta-llama/Llama-2-13b-hf"), ("beta", "0.3"), ("load_in_4bit", "false"),
    ("dataset_name", "other/pairs"), ("train_data_dir", "data/finetune"), ("lr_scheduler_type", "linear"),
    ("warmup_steps", "10"), ("weight_decay", "0.01"), ("optim", "adamw_torch"), ("gradient_accumulation_steps", "2"),
    ("max_steps", "500"), ("lora_r", "16"), ("lora_alpha", "32"), ("lora_dropout", "0.1"),
    ("lora_target_modules", "q_proj,v_proj"), ("max_prompt_length", "256"), ("max_length", "512"),
    ("max_train_samples", "1000"),
]
# Tracking, saving and speed settings, which a resumed run may change.
PPO_MAY_CHANGE = ["--logging_steps", "3", "--save_steps", "5", "--sample_every", "2", "--run_name", "again",
                  "--num_eval_prompts", "16", "--eval_batch_size", "8", "--reward_batch_size", "32"]
DPO_MAY_CHANGE = ["--logging_steps", "3", "--save_steps", "5", "--eval_steps", "7", "--run_name", "again",
                  "--num_eval_generations", "1", "--max_new_tokens", "16", "--per_device_eval_batch_size", "2"]


@pytest.mark.parametrize("module, setting, value", [(ppo, *row) for row in PPO_MUST_MATCH]
                         + [(dpo, *row) for row in DPO_MUST_MATCH],
                         ids=[f"ppo-{row[0]}" for row in PPO_MUST_MATCH] + [f"dpo-{row[0]}" for row in DPO_MUST_MATCH])
def test_a_resumed_run_with_a_setting_that_shapes_training_changed_is_refused_by_name(module, setting, value,
                                                                                     tmp_path):
    """Hole: a setting dropped from RESUME_MUST_MATCH (learning_rate was) let a resumed run change it silently."""
    out = tmp_path / "run"
    out.mkdir()
    saved = plain_args(module, out)
    (out / "settings.json").write_text(json.dumps(vars(saved)))  # as prepare_output_dir records them
    (out / "checkpoint-1").mkdir()
    before = fingerprint(out)
    changed = plain_args(module, out, f"--{setting}", value)
    assert getattr(changed, setting) != getattr(saved, setting)
    message = refusal(module.check_resume_settings, changed, str(out / "checkpoint-1"))
    assert f"--{setting} {getattr(saved, setting)} -> {getattr(changed, setting)}" in message, message
    assert refused_settings(message) == [setting]
    assert fingerprint(out) == before


@pytest.mark.parametrize("module, may_change", [(ppo, PPO_MAY_CHANGE), (dpo, DPO_MAY_CHANGE)], ids=["ppo", "dpo"])
def test_a_resumed_run_may_change_its_tracking_and_saving_settings(module, may_change, tmp_path):
    """Keeps the refusal test honest: the check does not refuse every change."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps(vars(plain_args(module, out))))
    (out / "checkpoint-1").mkdir()
    assert module.check_resume_settings(plain_args(module, out, *may_change), str(out / "checkpoint-1")) is None


def test_ppo_resume_with_another_learning_rate_is_refused_from_the_command_line_and_nothing_changes(ppo_assets,
                                                                                                   tmp_path):
    """End to end: an interrupted PPO run resumed with another --learning_rate stops, naming it; no file changes."""
    out = tmp_path / "run"
    run_tiny(ppo, ppo_assets, out, *PPO_RUN)
    as_if_interrupted_after_its_checkpoints(out)
    before = fingerprint(out)
    assert "checkpoint-4/counters.json" in before and "settings.json" in before
    message = refusal(run_tiny, ppo, ppo_assets, out, *PPO_RUN, "--resume", "--learning_rate", "1e-4",
                      "--logging_steps", "3")
    assert re.search(r"--resume .*checkpoint-4': the run that wrote it was trained with other settings "
                     r"\(--learning_rate 0\.0005 -> 0\.0001\).* Nothing was loaded", message), message
    assert refused_settings(message) == ["learning_rate"]
    assert fingerprint(out) == before


def test_dpo_resume_with_another_learning_rate_is_refused_from_the_command_line_and_nothing_changes(dpo_assets,
                                                                                                   tmp_path):
    """End to end: an interrupted DPO run resumed with another --learning_rate stops, naming it; no file changes."""
    out = tmp_path / "run"
    run_tiny(dpo, dpo_assets, out, *DPO_RUN, "--save_steps", "2")
    as_if_interrupted_after_its_checkpoints(out)
    before = fingerprint(out)
    assert "checkpoint-4/trainer_state.json" in before and "settings.json" in before
    message = refusal(run_tiny, dpo, dpo_assets, out, *DPO_RUN, "--save_steps", "2", "--resume", "--learning_rate",
                      "1e-3", "--logging_steps", "3")
    assert re.search(r"--resume .*checkpoint-4': the run that wrote it was trained with other settings "
                     r"\(--learning_rate 0\.002 -> 0\.001\).* Nothing was loaded", message), message
    assert refused_settings(message) == ["learning_rate"]
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------------------- the reward's label
def test_the_reward_is_the_named_labels_logit_wherever_the_classifier_puts_it(ppo_assets, tmp_path):
    """Hole: a fixed index 0 in place of label2id[--positive_label] passed, the tiny classifier having POSITIVE at 0."""
    original = os.path.join(ppo_assets, "distilbert")
    classifier = AutoModelForSequenceClassification.from_pretrained(original).eval()
    assert classifier.config.label2id == {"POSITIVE": 0, "NEGATIVE": 1}
    # The same classifier with its outputs the other way round: NEGATIVE first.
    reversed_dir = str(tmp_path / "reversed")
    flipped = AutoModelForSequenceClassification.from_pretrained(original)
    with torch.no_grad():
        flipped.classifier.weight.copy_(flipped.classifier.weight.flip(0))
        flipped.classifier.bias.copy_(flipped.classifier.bias.flip(0))
    flipped.config.id2label, flipped.config.label2id = {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    flipped.save_pretrained(reversed_dir)
    classifier_tokenizer = AutoTokenizer.from_pretrained(original)
    classifier_tokenizer.save_pretrained(reversed_dir)

    texts = ["The acting was wonderful and the story was moving.", "Every scene was dull.",
             "Honestly, the ending felt awful, even painful. Skip this one.", "A great, great film."]
    with torch.no_grad():
        batch = classifier_tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        logits = classifier(**batch).logits
        torch.testing.assert_close(flipped.eval()(**batch).logits, logits.flip(-1))
    positive, negative = logits[:, 0], logits[:, 1]
    assert (positive - negative).abs().min() > 0.1  # the two labels' logits tell apart

    for directory, label, expected in ((reversed_dir, "POSITIVE", positive), (original, "NEGATIVE", negative)):
        args = ppo.parse_args(tiny_argv(ppo_assets, tmp_path / "out", "--reward_model_name_or_path", directory,
                                        "--positive_label", label))
        reward = ppo.load_reward_model(args, ppo.load_policy_tokenizer(args))
        torch.testing.assert_close(reward.backbone.score_texts(texts), expected)


# ---------------------------------------------------------------------------------------------- nothing lost
def test_a_finished_dpo_run_without_checkpoints_is_never_overwritten(dpo_assets, tmp_path):
    """Hole: with the refusal of a finished run removed (checkpoints still refused), no DPO test reran into a
    finished run without checkpoints, the tiny preset's default (--save_steps 0)."""
    out = tmp_path / "run"
    run_tiny(dpo, dpo_assets, out, *DPO_RUN, "--save_steps", "0")
    before = fingerprint(out)
    assert "eval.json" in before and "adapter_model.safetensors" in before
    assert not list(out.glob("checkpoint-*"))
    stops_with(r"holds a finished run \(adapter_model.safetensors, eval.json\); a new run would overwrite it. "
               r"Nothing was changed.*--overwrite_output_dir", run_tiny, dpo, dpo_assets, out, *DPO_RUN,
               "--save_steps", "0")
    assert fingerprint(out) == before
    stops_with(r"holds a finished run .*resuming from a checkpoint \(it kept none: --save_steps\).* Nothing was "
               r"changed", run_tiny, dpo, dpo_assets, out, *DPO_RUN, "--resume")
    assert fingerprint(out) == before


# ---------------------------------------------------------------------------------------------- settings reach TRL
# (setting in Args, value other than the default, attribute of the config the script builds, the value expected).
PPO_TO_CONFIG = [
    ("learning_rate", "2e-5", "learning_rate", 2e-5),
    ("batch_size", "24", "per_device_train_batch_size", 12),  # the script divides by gradient_accumulation_steps
    ("batch_size", "24", "local_rollout_forward_batch_size", 24),
    ("gradient_accumulation_steps", "2", "gradient_accumulation_steps", 2),
    ("num_mini_batches", "3", "num_mini_batches", 3),
    ("num_ppo_epochs", "2", "num_ppo_epochs", 2),
    ("kl_coef", "0.3", "kl_coef", 0.3),
    ("cliprange", "0.1", "cliprange", 0.1),
    ("cliprange_value", "0.3", "cliprange_value", 0.3),
    ("vf_coef", "0.5", "vf_coef", 0.5),
    ("gamma", "0.9", "gamma", 0.9),
    ("lam", "0.8", "lam", 0.8),
    ("response_length", "12", "response_length", 12),
    ("temperature", "0.9", "temperature", 0.9),
    ("seed", "7", "seed", 7),
    ("total_episodes", "256", "total_episodes", 256),
]
DPO_TO_CONFIG = [  # max_prompt_length: DPOConfig (TRL 1.12) has no such field; the script filters pairs by it
    ("learning_rate", "1e-4", "learning_rate", 1e-4),
    ("beta", "0.3", "beta", 0.3),
    ("per_device_train_batch_size", "2", "per_device_train_batch_size", 2),
    ("gradient_accumulation_steps", "8", "gradient_accumulation_steps", 8),
    ("max_steps", "20", "max_steps", 20),
    ("lr_scheduler_type", "constant_with_warmup", "lr_scheduler_type", "constant_with_warmup"),
    ("warmup_steps", "5", "warmup_steps", 5),
    ("max_length", "256", "max_length", 256),
    ("weight_decay", "0.01", "weight_decay", 0.01),
    ("optim", "adamw_torch", "optim", "adamw_torch"),
    ("seed", "7", "seed", 7),
]
LORA_TO_CONFIG = [
    ("lora_r", "4", "r", 4),
    ("lora_alpha", "8", "lora_alpha", 8),
    ("lora_dropout", "0.1", "lora_dropout", 0.1),
    ("lora_target_modules", "q_proj,v_proj,down_proj", "target_modules", {"q_proj", "v_proj", "down_proj"}),
]


def flags(table) -> list:
    return [part for setting, value in dict((row[0], row[1]) for row in table).items()
            for part in (f"--{setting}", value)]


def carried(config, attribute):
    value = getattr(config, attribute)
    return set(value) if isinstance(value, (list, tuple, set)) else value


def assert_carries(table, config, default_config):
    for setting, _, attribute, expected in table:
        assert carried(default_config, attribute) != expected, f"{setting}: pick a value other than the default"
        assert carried(config, attribute) == expected, f"--{setting} did not reach {attribute}"


def test_ppo_settings_reach_the_ppo_config(tmp_path):
    """Hole: a fixed kl_coef=0.0 (or any setting not passed on) in the PPOConfig went unnoticed."""
    config = ppo.build_ppo_config(plain_args(ppo, tmp_path, *flags(PPO_TO_CONFIG)), eval_size=8)
    assert_carries(PPO_TO_CONFIG, config, ppo.build_ppo_config(plain_args(ppo, tmp_path), eval_size=8))


def test_dpo_settings_reach_the_dpo_config(tmp_path):
    """Hole: a fixed beta=0.1 (or any setting not passed on) in the DPOConfig went unnoticed."""
    config = dpo.build_dpo_config(plain_args(dpo, tmp_path, *flags(DPO_TO_CONFIG)))
    assert_carries(DPO_TO_CONFIG, config, dpo.build_dpo_config(plain_args(dpo, tmp_path)))


def test_lora_settings_reach_the_lora_config(dpo_assets, tmp_path):
    """The LoRA rank, alpha, dropout and targets reach peft's LoraConfig."""
    default_args = dpo.parse_args(tiny_argv(dpo_assets, tmp_path))
    model = dpo.load_model(default_args)
    config = dpo.lora_config(dpo.parse_args(tiny_argv(dpo_assets, tmp_path, *flags(LORA_TO_CONFIG))), model)
    assert_carries(LORA_TO_CONFIG, config, dpo.lora_config(default_args, model))
