"""DPO script: pairs and filtering, the prompt boundary, 4-bit + LoRA, the reference, tiny runs, learning, resume."""
import json
import math
import os
import re
import shlex
import shutil
import signal

import bitsandbytes
import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOTrainer

import dpo_llama2_stackexchange as dpo
from helpers import (HUB, DPO_SCRIPT, accelerate_launch, launch_then_interrupt,
                     right_tool_share, run_cli, run_printed_launch, run_then_signal, run_tiny, stops_with, tiny_argv)

LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_args(assets, tmp_path, *extra):
    return dpo.parse_args(tiny_argv(assets, tmp_path, *extra))


def write_pairs(directory, rows, data_dir="data/rl"):
    os.makedirs(os.path.join(directory, data_dir), exist_ok=True)
    with open(os.path.join(directory, data_dir, "train.jsonl"), "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(directory)


def raw_pairs(assets, data_dir="data/evaluation"):
    return [json.loads(line) for line in open(os.path.join(assets, "stack-exchange-paired", data_dir, "train.jsonl"))]


# ---------------------------------------------------------------------------------------------- settings
def test_defaults_follow_the_recipe_and_reach_the_trainer(tmp_path):
    args = dpo.parse_args([])
    assert (args.model_name_or_path, args.beta, args.learning_rate) == ("meta-llama/Llama-2-7b-hf", 0.1, 5e-4)
    assert (args.max_length, args.max_prompt_length, args.optim) == (1024, 512, "paged_adamw_32bit")
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16
    # The anchor declared a weight decay and never passed it, and read an undefined num_proc.
    config = dpo.build_dpo_config(dpo.parse_args(["--device", "cpu", "--optim", "adamw_torch",
                                                  "--weight_decay", "0.07", "--dataset_num_proc", "2",
                                                  "--output_dir", str(tmp_path)]))
    assert config.weight_decay == 0.07 and config.dataset_num_proc == 2 and config.beta == 0.1
    assert config.max_length == 1024 and config.optim == "adamw_torch" and config.gradient_checkpointing
    assert dpo.build_dpo_config(dpo.parse_args(["--device", "cpu", "--optim", "adamw_torch"])).weight_decay == 0.05


# ---------------------------------------------------------------------------------------------- data
def test_pairs_map_to_the_recipe_text_with_the_prompt_a_true_token_prefix(dpo_assets, tmp_path):
    args = tiny_args(dpo_assets, tmp_path)
    tokenizer = dpo.load_tokenizer(args)
    question, good, bad = "How do I join two strings in go?", "Use the concatenation operator.", "Use a set."
    pair = dpo.make_pair(question, good, bad)
    assert pair["prompt"] + pair["chosen"] == "Question: " + question + "\n\nAnswer: " + good
    assert pair["prompt"] + pair["rejected"] == "Question: " + question + "\n\nAnswer: " + bad

    naive_prompt = "Question: " + question + "\n\nAnswer: "
    naive = tokenizer(naive_prompt)["input_ids"]
    assert tokenizer(naive_prompt + good)["input_ids"][: len(naive)] != naive  # the trap is real here

    pairs = dpo.load_pairs(args, tokenizer, args.train_data_dir, None, "train_data_dir")
    for row in pairs.select(range(50)):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        assert tokenizer(row["prompt"] + row["chosen"])["input_ids"][: len(prompt_ids)] == prompt_ids
        assert tokenizer(row["prompt"] + row["rejected"])["input_ids"][: len(prompt_ids)] == prompt_ids

    # Through TRL's own tokenization: each completion keeps its first word.
    holder = type("Holder", (), {"_tokenizer": tokenizer})()
    config = dpo.build_dpo_config(args)
    tokenized = DPOTrainer._prepare_dataset(holder, Dataset.from_list([pair]), tokenizer, config, "train")
    assert tokenizer.decode(tokenized[0]["chosen_ids"], skip_special_tokens=True) == good
    assert tokenizer.decode(tokenized[0]["rejected_ids"], skip_special_tokens=True) == bad


def test_pairs_are_filtered_by_tokens_not_characters_with_parallel_map(dpo_assets, tmp_path):
    short_in_chars = "日本語の質問です" * 2  # 16 characters, but about 50 byte-fallback tokens
    long_in_chars = " ".join(["How do I reverse a list in python?"] * 3)  # 104 characters, under 48 tokens
    rows = [{"question": q, "response_j": "Use the reversed function.", "response_k": "Use a set."}
            for q in (short_in_chars, long_in_chars)]
    directory = write_pairs(tmp_path / "pairs", rows)
    args = tiny_args(dpo_assets, tmp_path, "--dataset_name", directory, "--dataset_num_proc", "2")
    tokenizer = dpo.load_tokenizer(args)
    assert len(tokenizer(dpo.make_pair(short_in_chars, "", "")["prompt"])["input_ids"]) > args.max_prompt_length
    kept = dpo.load_pairs(args, tokenizer, "data/rl", None, "train_data_dir")
    assert list(kept["prompt"]) == [dpo.make_pair(long_in_chars, "", "")["prompt"]]

    args = tiny_args(dpo_assets, tmp_path)
    pairs = dpo.load_pairs(args, tokenizer, args.train_data_dir, None, "train_data_dir")
    assert 0 < len(pairs) < 600  # the tiny set has a few overlong questions
    for row in pairs:
        assert len(tokenizer(row["prompt"])["input_ids"]) <= args.max_prompt_length
        longest = max(len(tokenizer(row["prompt"] + row[key])["input_ids"]) for key in ("chosen", "rejected"))
        assert longest + 1 <= args.max_length


@pytest.mark.parametrize("data_dir, setting", [("data/rl", "train_data_dir"), ("data/evaluation", "eval_data_dir")])
def test_pairs_that_cannot_teach_a_preference_are_dropped_with_a_count_per_reason(dpo_assets, tmp_path, capsys,
                                                                                  data_dir, setting):
    good = raw_pairs(dpo_assets, "data/rl")[:20]
    broken = [{"question": None, "response_j": "a", "response_k": "b"},
              {"question": "q", "response_j": None, "response_k": "b"},
              {"question": "q", "response_j": "Use a set.", "response_k": "Use a set."},
              {"question": "q", "response_j": "  ", "response_k": "b"},
              {"question": "q", "response_j": "a", "response_k": ""}]
    directory = write_pairs(tmp_path / "pairs", good + broken, data_dir)
    args = tiny_args(dpo_assets, tmp_path, "--dataset_name", directory)
    pairs = dpo.load_pairs(args, dpo.load_tokenizer(args), data_dir, None, setting)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{data_dir}: kept {len(pairs)} of 25 pairs; dropped 2 with a missing question or answer, 2 with an " \
           f"empty answer, 1 with identical answers" in line
    assert len(pairs) == 20 - int(line.split(", ")[-1].split()[0])  # the rest: only the token limits


def test_missing_columns_empty_datasets_and_missing_data_dirs_are_explained(dpo_assets, tmp_path):
    directory = write_pairs(tmp_path / "wrong", [{"question": "q", "answer": "a"}])
    args = tiny_args(dpo_assets, tmp_path, "--dataset_name", directory)
    tokenizer = dpo.load_tokenizer(args)
    stops_with(r"lacks the column\(s\) response_j, response_k \(it has: question, answer\).*--dataset_name",
               dpo.load_pairs, args, tokenizer, "data/rl", None, "train_data_dir")
    args = tiny_args(dpo_assets, tmp_path, "--max_prompt_length", "3")
    stops_with(r"No usable pair is left in .*: kept none of 600 pairs; dropped 0 with a missing question or answer, 0 "
               r"with an empty answer, 0 with identical answers, 600 over --max_prompt_length 3", dpo.load_pairs, args,
               tokenizer, "data/rl", None, "train_data_dir")
    directory = write_pairs(tmp_path / "same", [{"question": "q", "response_j": "Use a set.",
                                                 "response_k": "Use a set."}] * 3)
    stops_with(r"No usable pair is left in .*: kept none of 3 pairs; dropped 0 with a missing question or answer, 0 "
               r"with an empty answer, 3 with identical answers, 0 over", dpo.load_pairs,
               tiny_args(dpo_assets, tmp_path, "--dataset_name", directory), tokenizer, "data/rl", None,
               "train_data_dir")
    write_pairs(tmp_path / "empty", [])
    stops_with(r"Could not load .*empty' \(--dataset_name and --train_data_dir\): StopIteration:?\. Check "
               r"--dataset_name "
               r"and --train_data_dir", dpo.load_pairs, tiny_args(dpo_assets, tmp_path, "--dataset_name",
                                                           str(tmp_path / "empty")), tokenizer, "data/rl", None,
               "train_data_dir")
    args = tiny_args(dpo_assets, tmp_path, "--eval_data_dir", "data/validation")
    stops_with(r"data/validation doesn't contain any data files.*Check --dataset_name and --eval_data_dir",
               dpo.load_pairs, args, tokenizer, args.eval_data_dir, 64, "eval_data_dir")


# ---------------------------------------------------------------------------------------------- model
def test_base_is_loaded_in_4bit_nf4_with_double_quantisation(dpo_assets, tmp_path, monkeypatch):
    args = tiny_args(dpo_assets, tmp_path)
    model = dpo.load_model(args)
    layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(layers) == 2 * len(LLAMA_PROJECTIONS)  # every projection of both layers
    assert all(layer.weight.quant_state.quant_type == "nf4" for layer in layers)
    assert all(layer.weight.quant_state.nested for layer in layers)  # double quantisation
    assert not any(p.requires_grad for p in model.parameters())  # frozen base, ready for k-bit training
    # On a GPU the compute dtype is bf16 (the anchor's bare load_in_4bit meant fp4 with fp32 compute).
    monkeypatch.setattr(dpo, "on_gpu", lambda args: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu_config = dpo.quantization_config(args)
    assert gpu_config.bnb_4bit_quant_type == "nf4" and gpu_config.bnb_4bit_use_double_quant
    assert gpu_config.bnb_4bit_compute_dtype == torch.bfloat16


def test_non_quantized_weights_stay_in_the_compute_dtype(dpo_assets, tmp_path, monkeypatch):
    """Embeddings, norms and lm_head are not upcast to fp32 (as peft's prepare_model_for_kbit_training would, which
    makes the whole residual stream fp32). bf16 is a GPU's compute dtype; forced here so that it shows on a CPU."""
    monkeypatch.setattr(dpo, "compute_dtype", lambda args: torch.bfloat16)
    model = dpo.load_model(tiny_args(dpo_assets, tmp_path))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert {m.weight.dtype for n, m in model.named_modules() if n.endswith("norm")} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_liger_kernel_is_on_only_where_a_gpu_and_the_package_are(tmp_path, monkeypatch):
    for gpu, installed in ((False, True), (True, True), (True, False)):
        monkeypatch.setattr(dpo, "on_gpu", lambda args: gpu)  # a GPU machine, as far as these settings go
        monkeypatch.setattr(dpo, "liger_installed", lambda: installed)
        argv = ["--output_dir", str(tmp_path), "--optim", "adamw_torch", "--device", "cpu"]
        monkeypatch.setattr(dpo, "DPOConfig", lambda **settings: settings)  # GPU settings, read on a CPU
        assert dpo.build_dpo_config(dpo.parse_args(argv))["use_liger_kernel"] is (gpu and installed)
        assert dpo.build_dpo_config(dpo.parse_args([*argv, "--no_use_liger_kernel"]))["use_liger_kernel"] is False


def test_lora_covers_every_attention_and_mlp_projection(dpo_assets, tmp_path):
    args = tiny_args(dpo_assets, tmp_path)
    model = dpo.load_model(args)
    config = dpo.lora_config(args, model)
    assert set(config.target_modules) == LLAMA_PROJECTIONS
    peft_model = get_peft_model(model, config)
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == LLAMA_PROJECTIONS
    stops_with(r"--lora_target_modules names fc_in, wte, which this model does not have",
               dpo.lora_config, tiny_args(dpo_assets, tmp_path, "--lora_target_modules", "q_proj,fc_in,wte"),
               dpo.load_model(args))


def lora_gradients(model, tokenizer, seed=0):
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, dpo.lora_config(dpo.parse_args([]), model))
    peft_model.train()
    batch = tokenizer(["Question: How do I merge two lists in go?\n\nAnswer: Use list concatenation."],
                      return_tensors="pt")
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    return {name: p.grad.clone() for name, p in peft_model.named_parameters() if p.requires_grad}


def test_lora_gradients_after_an_eval_pass_equal_those_of_a_fresh_load(dpo_assets, tmp_path):
    """Guards bitsandbytes' CPU repack bug (wrong LoRA gradients after an eval-mode no-grad forward on CPUs with
    AVX512-BF16): the script turns the repack off on every 4-bit layer."""
    args = tiny_args(dpo_assets, tmp_path)
    tokenizer = dpo.load_tokenizer(args)
    fresh = lora_gradients(dpo.load_model(args), tokenizer)
    model = dpo.load_model(args)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit))
    pairs = dpo.load_pairs(args, tokenizer, args.eval_data_dir, 8, "eval_data_dir")
    dpo.evaluate(model, tokenizer, pairs, args)  # eval mode, no grad, and a generate: every trigger of the bug
    after_eval = lora_gradients(model, tokenizer)
    assert fresh.keys() == after_eval.keys() and len(fresh) == 4 * len(LLAMA_PROJECTIONS)
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-4, atol=1e-6)


def test_the_trainer_the_script_builds_uses_the_base_with_adapters_disabled_as_reference(dpo_assets, tmp_path,
                                                                                        monkeypatch):
    """The script's own trainer, caught as main() starts training: no second model, a peft model (with gradient
    checkpointing on) whose trained adapters move the logits, and with them disabled, exactly the base's logits (a
    fresh load's)."""
    built = []
    real_train = dpo.QLoRADPOTrainer.train
    monkeypatch.setattr(dpo.QLoRADPOTrainer, "train", lambda self, **kw: built.append(self) or real_train(self, **kw))
    run_tiny(dpo, dpo_assets, tmp_path, "--max_steps", "5", "--eval_steps", "0", "--num_eval_generations", "0")
    (trainer,) = built
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    assert trainer.model.is_gradient_checkpointing
    args = tiny_args(dpo_assets, tmp_path / "fresh")
    tokenizer = dpo.load_tokenizer(args)
    ids = tokenizer(["Question: How do I sort a dictionary by value in ruby?\n\nAnswer:"], return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        base_logits = dpo.load_model(args)(**ids).logits
        assert not torch.allclose(trainer.model(**ids).logits, base_logits, atol=1e-4)  # the adapters learned
        with trainer.model.disable_adapter():
            torch.testing.assert_close(trainer.model(**ids).logits, base_logits)


def test_a_model_directory_without_tokenizer_files_stops_in_one_paragraph_naming_the_setting(dpo_assets, tmp_path):
    """transformers 5 fails there with "Couldn't instantiate the backend tokenizer from one of: ...": one paragraph
    with that message that names the setting, and nothing written."""
    bare = tmp_path / "bare_llama"
    AutoModelForCausalLM.from_pretrained(os.path.join(dpo_assets, "llama")).save_pretrained(bare)
    stops_with(rf"^error: Could not load '{bare}' \(--model_name_or_path\): ValueError: Couldn't instantiate the "
               r"backend tokenizer.* Check --model_name_or_path", run_tiny, dpo, dpo_assets, tmp_path / "out",
               "--model_name_or_path", bare)
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--model_name_or_path", "meta-llama/Llama-2-7b-hf"], HUB + r".*Check --model_name_or_path"),
    (["--model_name_or_path", "./missing/llama"], r"looks like a local path, but nothing exists there"),
    (["--max_prompt_length", "200", "--max_length", "100"], r"--max_prompt_length \(200\) must be below"),
    (["--optim", "paged_adamw_32bit"], r"--optim paged_adamw_32bit needs a CUDA GPU"),
    (["--beta", "0"], r"--beta must be positive"),
    (["--max_steps", "0"], r"--max_steps must be positive"),
    (["--logging_steps", "0"], r"--logging_steps must be positive"),
    (["--max_train_samples", "0"], r"--max_train_samples must be positive, got 0"),
    (["--lora_dropout", "1.5"], r"--lora_dropout must be at least 0 and below 1, got 1.5"),
    (["--lora_dropout", "1"], r"--lora_dropout must be at least 0 and below 1, got 1.0"),
    (["--lora_target_modules", ", "], r"--lora_target_modules names no module \(got ', '\): give the comma-separated "
                                      r"names of the linear layers LoRA adapts, such as q_proj,"),
    (["--lora_alpha", "0"], r"--lora_alpha must be positive, got 0"),
    (["--weight_decay", "-0.1"], r"--weight_decay must be 0 or more, got -0.1"),
    (["--warmup_steps", "-1"], r"--warmup_steps must be 0 or more, got -1"),
    (["--save_steps", "-1"], r"--save_steps must be 0 or more, got -1"),
    (["--eval_steps", "-1"], r"--eval_steps must be 0 or more, got -1"),
    (["--num_eval_generations", "-1"], r"--num_eval_generations must be 0 or more, got -1"),
    (["--lr_scheduler_type", "cosin"], r"--lr_scheduler_type 'cosin' is not one transformers knows. It takes: linear, "
                                       r"cosine,"),
    (["--optim", "adamw_torhc"], r"--optim 'adamw_torhc' is not one transformers knows. It takes: .*adamw_torch,"),
    (["--max_length", "4096"], r"--max_length \(4096\) exceeds the model's context of 128 tokens"),
    (["--resume"], r"--resume: no checkpoint of this script in --output_dir"),
])
def test_bad_settings_stop_before_training(dpo_assets, tmp_path, extra, expected):
    stops_with(expected, run_tiny, dpo, dpo_assets, tmp_path, *extra)
    assert not os.path.exists(tmp_path / "eval.json")


def test_more_bad_settings_stop_before_training(dpo_assets, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    stops_with(r"--output_dir .* cannot be written to .*Choose a directory you can write to", run_tiny, dpo, dpo_assets,
               blocker / "out")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as where it cannot be imported
    stops_with(r"--load_in_4bit needs bitsandbytes, which cannot run here.*--load_in_4bit false", run_tiny, dpo,
               dpo_assets, tmp_path)


def test_the_merged_model_is_bf16_only_where_the_gpu_has_bf16(tmp_path, monkeypatch):
    asked = []

    def loading(name, dtype):
        asked.append(dtype)
        raise InterruptedError  # stop before any weights are read

    monkeypatch.setattr(dpo.AutoModelForCausalLM, "from_pretrained", loading)
    monkeypatch.setattr(dpo, "on_gpu", lambda args: True)
    for supported in (True, False):  # an A100 or H100, then a V100 or T4
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        with pytest.raises(InterruptedError):
            dpo.merge_full_model(dpo.parse_args(["--output_dir", str(tmp_path)]), tokenizer=None)
    assert asked == [torch.bfloat16, torch.float32]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_run_saves_an_adapter_that_reproduces_its_score_and_merges(dpo_assets, tmp_path):
    """The adapter, loaded back on the base on its own, gives the trained accuracy and margin in eval.json (within
    1e-4); the merged model gives the adapter's logits, which differ from the base's (the adapter learned)."""
    out = tmp_path / "run"
    completed = run_cli(DPO_SCRIPT, tiny_argv(dpo_assets, out, "--max_steps", "20", "--eval_steps", "10",
                                              "--merge_full_model", "true", "--max_eval_samples", "16"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Held-out preference evaluation" in completed.stdout
    assert re.findall(r"(\d+)/(\d+) \[", completed.stderr)[-1] == ("20", "20")  # a progress bar, to its end
    result = json.loads((out / "eval.json").read_text())
    assert result["steps"] == 20 and len(result["trained"]["generations"]) == 3
    assert abs(result["train_log"][0]["loss"] - math.log(2)) < 0.02  # logged at step 10: still near ln 2
    args = tiny_args(dpo_assets, tmp_path / "check", "--max_eval_samples", "16")
    tokenizer = AutoTokenizer.from_pretrained(out)
    pairs = dpo.load_pairs(args, tokenizer, args.eval_data_dir, args.max_eval_samples, "eval_data_dir")
    quantized = PeftModel.from_pretrained(dpo.load_model(args), out).eval()  # the 4-bit base it was trained on
    again, _ = dpo.evaluate(quantized, tokenizer, pairs, args)
    assert again["accuracy"] == pytest.approx(result["trained"]["accuracy"], abs=1e-4)
    assert again["margin"] == pytest.approx(result["trained"]["margin"], abs=1e-4)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(dpo_assets, "llama"))  # unquantised, as merged
    batch = tokenizer(["Question: How do I merge two lists in go?\n\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**batch).logits
        adapter_logits = PeftModel.from_pretrained(base, out).eval()(**batch).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "merged")(**batch).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-3, atol=1e-3)


def run_counting_model_loads(assets, out, *extra) -> tuple:
    """run_tiny, and the path of every causal language model loaded while it runs."""
    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting_from_pretrained))
        return run_tiny(dpo, assets, out, *extra), loads


@pytest.mark.slow
def test_dpo_learns_the_held_out_preference_with_one_base_model(dpo_assets, tmp_path):
    """Through the script's evaluation: held-out accuracy rises by at least 0.25 and DPO's implicit reward margin
    exceeds 0.5. Without it: (a) scored from the raw dataset columns, response_j gains over response_k against the
    base by more than 1 nat per pair on average, and (b) greedy answers name the tool the preference set prefers
    for the question's task more often than the base's do (by at least 0.1; chance is 0.1). Measured on 2 CPU
    cores: seed 0 accuracy 0.500 -> 0.983, right tool 0.10 -> 0.32; seed 1 0.466 -> 0.983 (its answers are not
    generated, to save time). Only one base model is ever loaded."""
    held_out = raw_pairs(dpo_assets)[:40]
    for seed, generations in ((0, 60), (1, 0)):  # the greedy answers of one seed: they take most of the time
        out = tmp_path / f"seed{seed}"
        result, loads = run_counting_model_loads(dpo_assets, out, "--seed", seed, "--num_eval_generations",
                                                 generations)
        base, trained = result["base"], result["trained"]
        assert len(loads) == 1, loads
        gain = raw_column_gain(dpo_assets, out, held_out)
        print(f"seed {seed}: accuracy {base['accuracy']:.3f} -> {trained['accuracy']:.3f}, response_j gain "
              f"{gain:.2f} nats")
        assert trained["accuracy"] >= base["accuracy"] + 0.25 and trained["implicit_reward_margin"] > 0.5
        assert gain > 1.0
        if generations:
            tool = {name: right_tool_share(r["generations"], dpo.TASKS) for name, r in (("base", base),
                                                                                        ("trained", trained))}
            print(f"seed {seed}: right tool {tool['base']:.2f} -> {tool['trained']:.2f}")
            assert tool["trained"] >= tool["base"] + 0.1


def raw_column_gain(assets, adapter_dir, rows) -> float:
    """Mean over held-out rows of [log p(response_j) - log p(response_k)] under base + adapter minus the same under
    the base, each answer scored after "Question: {question}\\n\\nAnswer:" from the dataset's own columns."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(assets, "llama")).eval()

    def score(model, prompt, answer):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return logps[len(prompt_ids) - 1 :].gather(-1, ids[0, len(prompt_ids) :, None]).sum().item()

    def gaps(model):
        return [score(model, f"Question: {r['question']}\n\nAnswer:", " " + r["response_j"])
                - score(model, f"Question: {r['question']}\n\nAnswer:", " " + r["response_k"]) for r in rows]

    before = gaps(base)
    after = gaps(PeftModel.from_pretrained(base, adapter_dir).eval())
    return sum(a - b for a, b in zip(after, before)) / len(rows)


# ---------------------------------------------------------------------------------------------- nothing lost
def test_a_finished_run_is_never_overwritten_silently(dpo_assets, tmp_path):
    out = tmp_path / "run"
    common = ["--max_steps", "4", "--eval_steps", "0", "--num_eval_generations", "0", "--max_eval_samples", "8"]
    run_tiny(dpo, dpo_assets, out, *common, "--save_steps", "2")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    stops_with(r"holds a finished run .* Nothing was changed.*--overwrite_output_dir", run_tiny, dpo, dpo_assets, out,
               *common)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    stops_with(r"holds a finished run .* would train again over it", run_tiny, dpo, dpo_assets, out, *common,
               "--resume")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    stops_with(r"the run that wrote it was trained with other settings \(--beta [\d.]+ -> 0.3\)", run_tiny, dpo,
               dpo_assets, out, *common, "--resume", "--overwrite_output_dir", "--beta", "0.3")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # checked before eval.json goes
    assert "adapter_model.safetensors" in before and "eval.json" in before
    result = run_tiny(dpo, dpo_assets, out, *common, "--overwrite_output_dir", "--save_steps", "0")
    assert result["steps"] == 4 and not list(out.glob("checkpoint-*"))


def test_a_crash_while_saving_a_checkpoint_leaves_none_that_looks_complete(dpo_assets, tmp_path, monkeypatch):
    common = ["--max_steps", "4", "--eval_steps", "0", "--num_eval_generations", "0", "--max_eval_samples", "8"]
    real_save = dpo.DPOTrainer._save_rng_state

    def crash(self, directory):
        raise MemoryError  # the process dies after the adapter and optimizer, before the RNG and trainer state

    monkeypatch.setattr(dpo.DPOTrainer, "_save_rng_state", crash)
    crashed = tmp_path / "crashed"
    with pytest.raises(MemoryError):
        run_tiny(dpo, dpo_assets, crashed, *common, "--save_steps", "2")
    assert not list(crashed.glob("checkpoint-*")) and (crashed / ".saving" / "checkpoint-2").is_dir()
    monkeypatch.setattr(dpo.DPOTrainer, "_save_rng_state", real_save)
    stops_with(r"--resume: no checkpoint of this script", run_tiny, dpo, dpo_assets, crashed, *common, "--resume")


# ---------------------------------------------------------------------------------------------- resume, interrupts
def adapter_weights(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def test_a_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(dpo_assets, tmp_path):
    """Tolerance: adapter weights equal within 1e-5 (measured: bit-identical on CPU)."""
    common = ["--max_steps", "20", "--save_steps", "10", "--eval_steps", "0", "--num_eval_generations", "0",
              "--max_eval_samples", "16"]
    straight = tmp_path / "straight"
    run_tiny(dpo, dpo_assets, straight, *common)
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    crashed = tmp_path / "crashed"  # as if the machine died right after the step-10 checkpoint
    shutil.copytree(straight / "checkpoint-10", crashed / "checkpoint-10")
    result = run_tiny(dpo, dpo_assets, crashed, *common, "--resume")
    assert result["steps"] == 20 and result["steps_this_run"] == 10
    assert json.loads((crashed / "checkpoint-20" / "trainer_state.json").read_text())["global_step"] == 20
    expected, resumed = adapter_weights(straight), adapter_weights(crashed)
    assert expected.keys() == resumed.keys()
    # TRL casts 4-bit models' adapters to bf16 and reloads checkpoints in fp32; both runs must train in fp32 here.
    assert {w.dtype for w in expected.values()} == {w.dtype for w in resumed.values()} == {torch.float32}
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_prints_how_to_resume_and_exits_143(dpo_assets, tmp_path):
    out = tmp_path / "run"
    code, output, _ = run_then_signal(DPO_SCRIPT, tiny_argv(dpo_assets, out, "--max_steps", "2000", "--save_steps",
                                                            "0", "--eval_steps", "0"), "Training:")
    assert code == 143, output[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").exists()
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 2000
    assert f"Stopped by SIGTERM after step {step} of 2000" in output
    assert f"--resume {checkpoints[0]}" in output and "Traceback" not in output


@pytest.mark.slow
def test_ctrl_c_during_the_final_evaluation_keeps_the_saved_adapter_and_exits_130(dpo_assets, tmp_path):
    out = tmp_path / "run"
    code, output, _ = run_then_signal(DPO_SCRIPT, tiny_argv(dpo_assets, out, "--max_steps", "5", "--eval_steps", "0",
                                                            "--num_eval_generations", "60", "--max_new_tokens", "64",
                                                            "--per_device_eval_batch_size", "1"),
                                      "Evaluating", delay=0.5, sig=signal.SIGINT)
    assert code == 130, output[-3000:]
    assert "SIGINT: stopped at once. The trained model is saved in --output_dir" in output
    assert "Traceback" not in output and not (out / "eval.json").exists()
    assert (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------- trackers
@pytest.mark.slow
def test_wandb_offline_run_records_the_evaluation_in_its_project_and_closes_cleanly(dpo_assets, tmp_path):
    completed = run_cli(DPO_SCRIPT, [*tiny_argv(dpo_assets, tmp_path / "run", "--max_steps", "10", "--eval_steps",
                                                "5"), "--report_to", "wandb", "--wandb_project", "tiny-dpo-project"],
                        cwd=str(tmp_path), WANDB_MODE="offline")
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    assert "eval_rewards/accuracies" in output and "rewards/margins" in output
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert [p.name.split("_")[0] for p in (run / "files" / "media" / "table").rglob("*.table.json")] == ["generations"]
    assert "ERROR" not in (run / "logs" / "debug.log").read_text()
    assert b"tiny-dpo-project" in next(run.glob("run-*.wandb")).read_bytes()  # the run's project


# ---------------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_match_one_process_step_by_step_and_resume_after_ctrl_c_on_two_only(dpo_assets, tmp_path):
    """accelerate launch --num_processes 2, 8 pairs per process, against one process with 16: the same data per
    step and averaged gradients, so the same loss and gradient norm at every step (within 1e-3 relative; LoRA
    dropout off so that both are deterministic) and the same held-out accuracy. Ctrl-C (SIGINT to the launcher and
    both processes, as a terminal sends it): one notice and one resume command, which launches two processes again
    and ends with the losses and adapter of the uninterrupted run (within 1e-5); on one process it is refused."""
    common = ["--max_steps", "20", "--eval_steps", "0", "--lora_dropout", "0", "--num_eval_generations", "1",
              "--save_steps", "10", "--logging_steps", "1"]
    single = run_tiny(dpo, dpo_assets, tmp_path / "one", *common, "--per_device_train_batch_size", "16")
    launched = accelerate_launch(DPO_SCRIPT, tiny_argv(dpo_assets, tmp_path / "two", *common,
                                                       "--per_device_train_batch_size", "8"))
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stdout.count("Training: 20 DPO steps on 2 x cpu") == 1
    assert "find_unused_parameters" not in launched.stderr  # DDP's warning, twice per run, before the setting
    double = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    assert [e["step"] for e in double["train_log"]] == [e["step"] for e in single["train_log"]] == list(range(1, 21))
    for key in ("loss", "grad_norm"):
        assert [e[key] for e in double["train_log"]] == pytest.approx([e[key] for e in single["train_log"]], rel=1e-3)
    assert double["base"]["accuracy"] == single["base"]["accuracy"]
    assert abs(double["trained"]["accuracy"] - single["trained"]["accuracy"]) <= 0.02

    stopped = tmp_path / "stopped"
    argv = tiny_argv(dpo_assets, stopped, *common, "--per_device_train_batch_size", "8")
    code, output = launch_then_interrupt(DPO_SCRIPT, argv, after=r" [5-9]/20 \[")
    assert code != 0 and output.count("SIGINT: finishing the current step") == 1, output[-3000:]
    assert output.count("Resume with:") == 1 and "it ran on 2 processes" in output
    command = output.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith(f"accelerate launch --multi_gpu --num_processes 2 --mixed_precision no {DPO_SCRIPT}")
    stops_with(r"--num_processes 2 -> 1", dpo.main, dpo.parse_args(shlex.split(command)[8:]))  # one process
    resumed = run_printed_launch(command)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = json.loads((stopped / "eval.json").read_text())["train_log"]  # the checkpoint's log, then this run's
    assert [e["step"] for e in log] == list(range(1, 21))
    for key in ("loss", "grad_norm"):
        assert [e[key] for e in log] == pytest.approx([e[key] for e in double["train_log"]], rel=1e-5)
    expected, got = adapter_weights(tmp_path / "two"), adapter_weights(stopped)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
