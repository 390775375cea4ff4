"""PPO script: data preparation, the reward adapter, clear errors, a full tiny run, and learning."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import ppo_gpt2_imdb as ppo
from conftest import REPO, run_then_sigterm, stops_with


def tiny_args(assets, tmp_path, *extra):
    return ppo.parse_args(["--preset", "tiny", "--tiny_assets_dir", assets, "--output_dir", str(tmp_path), *extra])


# ---------------------------------------------------------------------------------------------- arguments
def test_preset_changes_defaults_but_explicit_flags_and_yaml_win(tmp_path):
    default = ppo.parse_args([])
    assert default.model_name_or_path == "lvwerra/gpt2-imdb" and default.learning_rate == 1.41e-5
    assert default.batch_size == 128 and default.num_ppo_epochs == 4 and default.response_length == 16
    tiny = ppo.parse_args(["--preset", "tiny", "--output_dir", str(tmp_path)])
    assert tiny.model_name_or_path == os.path.join(str(tmp_path), "tiny_assets", "gpt2")
    assert tiny.learning_rate == ppo.PRESETS["tiny"]["learning_rate"]
    explicit = ppo.parse_args(["--preset", "tiny", "--learning_rate", "0.5", "--model_name_or_path", "my/model"])
    assert explicit.learning_rate == 0.5 and explicit.model_name_or_path == "my/model"
    config = tmp_path / "run.yaml"
    config.write_text("kl_coef: 0.3\nbatch_size: 64\n")
    from_yaml = ppo.parse_args(["--config", str(config), "--batch_size", "16"])
    assert from_yaml.kl_coef == 0.3 and from_yaml.batch_size == 16  # CLI beats YAML beats defaults


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


def test_missing_text_column_and_empty_dataset_are_explained(ppo_assets, tmp_path):
    args = tiny_args(ppo_assets, tmp_path, "--text_column", "body")
    stops_with(r"no 'body' column \(it has: text, label\).*--text_column", ppo.load_prompts, args,
               ppo.load_policy_tokenizer(args))
    args = tiny_args(ppo_assets, tmp_path, "--min_review_chars", "100000")
    stops_with("No review .* longer than --min_review_chars", ppo.load_prompts, args, ppo.load_policy_tokenizer(args))


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


def test_unknown_positive_label_is_explained(ppo_assets, tmp_path):
    args = tiny_args(ppo_assets, tmp_path, "--positive_label", "LABEL_1")
    stops_with(r"no label 'LABEL_1'.*NEGATIVE.*POSITIVE.*--positive_label", ppo.load_reward_model, args,
               ppo.load_policy_tokenizer(args))


# ---------------------------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("setting, value, expected", [
    ("--model_name_or_path", "./no/such/model", r"--model_name_or_path='./no/such/model' looks like a local path"),
    ("--model_name_or_path", "someone/not-downloaded", r"Hub cannot be reached.*--model_name_or_path.*--preset tiny"),
    ("--reward_model_name_or_path", "someone/not-downloaded",
     r"Hub cannot be reached.*--reward_model_name_or_path"),
    ("--dataset_name", "someone/no-dataset", r"Hub cannot be reached.*--dataset_name"),
    ("--batch_size", "31", r"--batch_size \(31\) must be a multiple of --num_mini_batches \(2\)"),
    ("--learning_rate", "0", r"--learning_rate must be positive"),
    ("--response_length", "100", r"exceeds the policy's context of 64 tokens"),
])
def test_bad_settings_stop_with_one_paragraph(ppo_assets, tmp_path, setting, value, expected):
    message = stops_with(expected, ppo.main, ["--preset", "tiny", "--tiny_assets_dir", ppo_assets,
                                              "--output_dir", str(tmp_path), setting, value])
    assert message.strip().count("\n\n") == 0 and len(message) < 800  # one short paragraph
    assert not os.path.exists(tmp_path / "eval.json")


def test_gated_model_message_names_the_fix():
    message = ppo.explain_load_error(OSError("You are trying to access a gated repo. 401 Client Error"),
                                     "meta-llama/Llama-2-7b-hf", "model_name_or_path")
    assert "gated" in message and "HF_TOKEN" in message and "--model_name_or_path" in message


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_run_from_the_command_line_saves_a_loadable_policy_and_eval_json(ppo_assets, tmp_path):
    out = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "ppo_gpt2_imdb.py", "--preset", "tiny", "--output_dir", str(out), "--tiny_assets_dir",
         ppo_assets, "--total_episodes", "128", "--num_eval_prompts", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Held-out evaluation" in completed.stdout and "reference" in completed.stdout
    result = json.loads((out / "eval.json").read_text())
    for name in ("reference", "trained"):
        assert isinstance(result[name]["reward_mean"], float) and result[name]["num_prompts"] == 16
        assert len(result[name]["samples"]) == 16
    assert result["reference"]["kl_to_reference"] == 0.0
    assert result["updates"] == 4 and result["seconds_per_update"] > 0 and result["samples_per_second"] > 0
    policy = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    generated = policy.generate(**tokenizer(["The film"], return_tensors="pt"), max_new_tokens=5, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > 2
    value_model = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert value_model.config.num_labels == 1


def test_ppo_learns_to_write_positive_reviews_across_seeds(ppo_assets, tmp_path):
    """Margin: after 40 PPO updates the trained policy's held-out reward mean beats the reference's by more than
    1.5 logits (measured on 2 CPU cores: seed 0 -0.33 -> 2.65, seed 1 -1.08 -> 3.25)."""
    for seed in (0, 1):
        result = ppo.main(["--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--output_dir",
                           str(tmp_path / f"seed{seed}"), "--seed", str(seed), "--total_episodes", "1280"])
        gain = result["trained"]["reward_mean"] - result["reference"]["reward_mean"]
        print(f"seed {seed}: reference {result['reference']['reward_mean']:.2f} -> trained "
              f"{result['trained']['reward_mean']:.2f}")
        assert gain > 1.5, f"seed {seed}: reward gain {gain:.2f}"
        assert result["trained"]["kl_to_reference"] > 0


def test_update_time_is_split_into_rollout_and_optimisation(ppo_assets, tmp_path):
    """The optimisation phase is the PPO epochs: eight epochs take several times one epoch's time while the rollout
    stays about the same (measured on 2 CPU cores: optimisation 0.036 -> 0.297 s, rollout 0.065 -> 0.069 s)."""
    results = {}
    for epochs in (1, 8):
        results[epochs] = ppo.main(["--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--output_dir",
                                    str(tmp_path / f"epochs{epochs}"), "--total_episodes", "160",
                                    "--num_eval_prompts", "8", "--num_ppo_epochs", str(epochs)])
    one, eight = results[1], results[8]
    assert eight["optimisation_seconds_per_update"] > 4 * one["optimisation_seconds_per_update"] > 0
    assert 0.5 < eight["rollout_seconds_per_update"] / one["rollout_seconds_per_update"] < 2


def test_trl_memory_freeing_is_skipped_unless_asked_for(ppo_assets, tmp_path, monkeypatch):
    """TRL's loop runs gc.collect() twice per update (measured: 0.22 s each on 2 CPU cores, two thirds of a tiny
    update); the script skips it, and TRL's CUDA cache emptying, unless --free_memory_each_update."""
    import gc

    real_collect, calls = gc.collect, []
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append(1) or real_collect(*args))
    counts = {}
    for free in ("false", "true"):
        calls.clear()
        ppo.main(["--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--output_dir", str(tmp_path / free),
                  "--total_episodes", "160", "--num_eval_prompts", "8", "--free_memory_each_update", free])
        counts[free] = len(calls)
    assert counts["true"] - counts["false"] >= 2 * 5  # two per update, 5 updates
    assert ppo.trl_ppo_module.gc is gc and ppo.trl_ppo_module.empty_cache.__module__ == "trl.experimental.utils"


def test_first_ppo_epoch_policy_ratio_stays_close_to_one(ppo_assets, tmp_path):
    """Rollout log-probabilities (from generation) against the PPO epoch's forward pass with the same weights. In
    fp32 they agree (measured 0.0 to 6 places on 2 CPU cores); under bf16 autocast (--bf16_autocast on a GPU, forced
    here through accelerate's environment variable) they differ by rounding (measured 0.0042 on CPU, 0.0034 on an
    H200) and stay far inside PPO's 0.2 clip range."""
    common = ["--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--total_episodes", "64", "--num_eval_prompts", "8"]
    fp32 = ppo.main([*common, "--output_dir", str(tmp_path / "fp32")])
    assert fp32["policy_ratio_error"] < 1e-4
    completed = subprocess.run([sys.executable, "ppo_gpt2_imdb.py", *common, "--output_dir", str(tmp_path / "bf16")],
                               cwd=REPO, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    bf16 = json.loads((tmp_path / "bf16" / "eval.json").read_text())["policy_ratio_error"]
    assert 1e-4 < bf16 < 0.05  # autocast really ran (the error moved), and stayed small


def test_static_cache_generation_serves_rollouts_only(ppo_assets, tmp_path, monkeypatch):
    """With --static_cache_generation every rollout decodes with a static cache (uncompiled on a CPU), while
    sample tables (another batch shape, which would compile again) and the evaluation keep the dynamic one."""
    import transformers.generation.utils as generation

    static_batches = []
    prepare = generation.GenerationMixin._prepare_static_cache

    def counting(self, cache_implementation, batch_size, *args, **kwargs):
        static_batches.append(batch_size)
        return prepare(self, cache_implementation, batch_size, *args, **kwargs)

    monkeypatch.setattr(generation.GenerationMixin, "_prepare_static_cache", counting)
    result = ppo.main(["--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--output_dir", str(tmp_path),
                       "--total_episodes", "160", "--num_eval_prompts", "8", "--sample_every", "2",
                       "--static_cache_generation", "true"])
    assert static_batches == [32] * 5  # five rollouts of 32 prompts; three sample tables and two evaluations not
    assert result["trained"]["num_prompts"] == 8


def test_tf32_is_asked_for_only_on_a_gpu_that_has_it(tmp_path, monkeypatch):
    """TRL's PPO trainer ignores bf16; TF32 is the GPU speed it can use. Asking for it without support raises."""
    from dataclasses import replace

    args = ppo.parse_args(["--output_dir", str(tmp_path), "--device", "cuda"])
    monkeypatch.setattr(ppo.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ppo, "is_torch_tf32_available", lambda: True)
    assert ppo.tf32_setting(args) is True
    assert ppo.tf32_setting(replace(args, tf32=False)) is False
    assert ppo.tf32_setting(replace(args, device="cpu")) is None
    monkeypatch.setattr(ppo, "is_torch_tf32_available", lambda: False)  # e.g. a V100 or T4
    assert ppo.tf32_setting(args) is None


# ---------------------------------------------------------------------------------------------- resume, interrupts
def test_a_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(ppo_assets, tmp_path):
    """TRL 1.12's PPO trainer cannot resume; the script checkpoints policy, value model, optimizer, schedule, RNG,
    counters and data position. Tolerance: equal within 1e-6 (measured: bit-identical on CPU)."""
    import shutil

    from safetensors.torch import load_file

    common = ["--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--total_episodes", "256", "--save_steps", "4",
              "--num_eval_prompts", "8", "--sample_every", "3"]  # sample tables on: they must not shift the RNG
    straight = tmp_path / "straight"
    ppo.main([*common, "--output_dir", str(straight)])
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    crashed = tmp_path / "crashed"  # as if the machine died right after the checkpoint of update 4
    shutil.copytree(straight / "checkpoint-4", crashed / "checkpoint-4")
    result = ppo.main([*common, "--output_dir", str(crashed), "--resume"])
    assert result["updates"] == 8 and result["updates_this_run"] == 4
    assert json.loads((crashed / "checkpoint-8" / "counters.json").read_text()) == {"global_step": 8, "episode": 256}
    for name in ("model.safetensors", "value_model/model.safetensors"):
        expected, resumed = load_file(straight / name), load_file(crashed / name)
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)


def test_sigterm_saves_a_checkpoint_prints_how_to_resume_and_exits_non_zero(ppo_assets, tmp_path):
    out = tmp_path / "run"
    code, output = run_then_sigterm("ppo_gpt2_imdb.py", [
        "--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--output_dir", str(out), "--total_episodes", "100000",
        "--save_steps", "0"])
    assert code == 143, output[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = json.loads((checkpoints[0] / "counters.json").read_text())["global_step"]
    assert 0 < step < 3125
    assert f"Stopped by SIGTERM after update {step} of 3125" in output
    assert f"--resume {checkpoints[0]}" in output and "Traceback" not in output
    assert not (out / "eval.json").exists()


def test_wandb_without_credentials_or_terminal_falls_back_to_offline(no_wandb_credentials, monkeypatch, capsys):
    ppo.prepare_tracking(ppo.parse_args(["--report_to", "wandb"]))
    assert os.environ["WANDB_MODE"] == "offline"
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "offline" in printed[0]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    ppo.prepare_tracking(ppo.parse_args(["--report_to", "wandb"]))
    assert os.environ["WANDB_MODE"] == "online"  # a user's explicit choice stays


def test_more_bad_settings_stop_before_training(ppo_assets, tmp_path):
    common = ["--preset", "tiny", "--tiny_assets_dir", ppo_assets]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    stops_with(r"--output_dir .* is not writable", ppo.main, [*common, "--output_dir", str(blocker / "out")])
    stops_with(r"--resume: no checkpoint of this script", ppo.main, [*common, "--output_dir", str(tmp_path),
                                                                     "--resume"])
    stops_with(r"--num_mini_batches and --gradient_accumulation_steps cannot both be above 1", ppo.main,
               [*common, "--output_dir", str(tmp_path), "--gradient_accumulation_steps", "2"])
    stops_with(r"--total_episodes must be positive", ppo.main, [*common, "--output_dir", str(tmp_path),
                                                                "--total_episodes", "0"])


# ---------------------------------------------------------------------------------------------- two processes
def test_two_processes_learn_and_write_once(ppo_assets, tmp_path):
    """accelerate launch --num_processes 2 --cpu with 16 prompts per process is the same update size as one process
    with 32. Sampling streams differ per process (TRL seeds each rank apart), so the check is statistical: the
    same held-out reference score as one process, and the trained policy beats it by the learning test's margin."""
    from conftest import accelerate_launch

    common = ["--preset", "tiny", "--tiny_assets_dir", ppo_assets, "--total_episodes", "1280", "--save_steps", "20"]
    single = ppo.main([*common, "--output_dir", str(tmp_path / "one"), "--total_episodes", "32"])
    launched = accelerate_launch("ppo_gpt2_imdb.py", [*common, "--output_dir", str(tmp_path / "two"),
                                                      "--batch_size", "16"])
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stdout.count("Held-out evaluation") == 1  # the report comes once
    assert launched.stdout.count("Training: 40 PPO updates of 16 prompts per process on 2 x cpu") == 1
    double = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert double["reference"]["reward_mean"] == single["reference"]["reward_mean"]
    assert double["trained"]["reward_mean"] - double["reference"]["reward_mean"] > 1.5
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    assert len(list((tmp_path / "two" / "checkpoint-40").glob("random_states_*.pkl"))) == 2  # every rank's RNG
    # TRL 1.12's save_model fails with several processes (it saves the DDP wrapper); the script saves the policy.
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "two").config.model_type == "gpt2"


def test_wandb_offline_run_records_sample_tables_reward_spread_and_closes_cleanly(ppo_assets, tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "ppo_gpt2_imdb.py"), "--preset", "tiny", "--tiny_assets_dir", ppo_assets,
         "--output_dir", str(tmp_path / "run"), "--report_to", "wandb", "--total_episodes", "320",
         "--sample_every", "5", "--logging_steps", "1", "--num_eval_prompts", "16"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    logged = completed.stdout + completed.stderr
    assert "objective/scores_std" in logged  # logged beside TRL's reward mean
    assert "time/rollout_seconds" in logged and "time/optimisation_seconds" in logged
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    tables = sorted(p.name.split("_")[0] for p in (run / "files" / "media" / "table").rglob("*.table.json"))
    assert tables == ["completions", "completions", "samples"]  # updates 1 and 6 of 10, then the evaluation
    assert "ERROR" not in (run / "logs" / "debug.log").read_text()
