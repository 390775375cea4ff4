"""DPO script: pairs and filtering, the prompt boundary, 4-bit + LoRA, the reference, a tiny run, and learning."""
import json
import os
import subprocess
import sys

import bitsandbytes
import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOTrainer

import dpo_llama2_stackexchange as dpo
from conftest import REPO, run_then_sigterm, stops_with

LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_args(assets, tmp_path, *extra):
    return dpo.parse_args(["--preset", "tiny", "--tiny_assets_dir", assets, "--output_dir", str(tmp_path), *extra])


def write_pairs(directory, rows, data_dir="data/rl"):
    os.makedirs(os.path.join(directory, data_dir), exist_ok=True)
    with open(os.path.join(directory, data_dir, "train.jsonl"), "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(directory)


# ---------------------------------------------------------------------------------------------- arguments
def test_defaults_follow_the_recipe_and_reach_the_trainer(tmp_path):
    args = dpo.parse_args([])
    assert (args.model_name_or_path, args.beta, args.learning_rate) == ("meta-llama/Llama-2-7b-hf", 0.1, 5e-4)
    assert (args.max_length, args.max_prompt_length, args.optim) == (1024, 512, "paged_adamw_32bit")
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

    pairs = dpo.load_pairs(args, tokenizer, args.train_data_dir, None)
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
    kept = dpo.load_pairs(args, tokenizer, "data/rl", None)
    assert list(kept["prompt"]) == [dpo.make_pair(long_in_chars, "", "")["prompt"]]

    args = tiny_args(dpo_assets, tmp_path)
    pairs = dpo.load_pairs(args, tokenizer, args.train_data_dir, None)
    assert 0 < len(pairs) < 600  # the tiny set has a few overlong questions
    for row in pairs:
        assert len(tokenizer(row["prompt"])["input_ids"]) <= args.max_prompt_length
        longest = max(len(tokenizer(row["prompt"] + row[key])["input_ids"]) for key in ("chosen", "rejected"))
        assert longest + 1 <= args.max_length


def test_missing_columns_and_empty_datasets_are_explained(dpo_assets, tmp_path):
    directory = write_pairs(tmp_path / "wrong", [{"question": "q", "answer": "a"}])
    args = tiny_args(dpo_assets, tmp_path, "--dataset_name", directory)
    tokenizer = dpo.load_tokenizer(args)
    stops_with(r"lacks the column\(s\) response_j, response_k \(it has: question, answer\).*--dataset_name",
               dpo.load_pairs, args, tokenizer, "data/rl", None)
    args = tiny_args(dpo_assets, tmp_path, "--max_prompt_length", "3")
    stops_with(r"No pair .* fits --max_prompt_length 3", dpo.load_pairs, args, tokenizer, "data/rl", None)


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


def test_non_quantized_weights_stay_in_the_compute_dtype_unless_upcast_is_asked_for(dpo_assets, tmp_path,
                                                                                      monkeypatch):
    """peft's prepare_model_for_kbit_training keeps fp32 copies of embeddings, norms and lm_head, which makes the
    whole residual stream fp32 on a GPU (H200, 16 pairs per step: 6.29 -> 4.90 s per step and 11.7 -> 9.0 GiB
    without them). bf16 is the GPU's compute dtype; forced here so that the difference shows on a CPU."""
    monkeypatch.setattr(dpo, "compute_dtype", lambda args: torch.bfloat16)
    kept = dpo.load_model(tiny_args(dpo_assets, tmp_path))
    upcast = dpo.load_model(tiny_args(dpo_assets, tmp_path, "--upcast_non_quantized", "true"))
    for model, dtype in ((kept, torch.bfloat16), (upcast, torch.float32)):
        assert model.get_input_embeddings().weight.dtype == dtype
        assert model.get_output_embeddings().weight.dtype == dtype
        assert {m.weight.dtype for n, m in model.named_modules() if n.endswith("norm")} == {dtype}
        assert not any(p.requires_grad for p in model.parameters())
        assert model.is_gradient_checkpointing


def test_liger_kernel_is_on_only_where_a_gpu_and_the_package_are(tmp_path, monkeypatch, capsys):
    cpu = dpo.parse_args(["--output_dir", str(tmp_path), "--device", "cpu", "--optim", "adamw_torch"])
    assert dpo.build_dpo_config(cpu).use_liger_kernel is False
    stops_with(r"--use_liger_kernel needs a CUDA GPU", dpo.validate,
               dpo.parse_args(["--output_dir", str(tmp_path), "--device", "cpu", "--optim", "adamw_torch",
                               "--use_liger_kernel", "true"]))
    monkeypatch.setattr(dpo, "on_gpu", lambda args: True)  # a GPU machine, as far as these settings go
    for installed in (True, False):
        monkeypatch.setattr(dpo, "liger_installed", lambda: installed)
        gpu = dpo.parse_args(["--output_dir", str(tmp_path)])
        assert dpo.use_liger(gpu) is installed
        dpo.validate(gpu)
        assert ("pip install liger-kernel" in capsys.readouterr().out) is not installed  # one line when missing
    stops_with(r"needs the liger-kernel package.*pip install liger-kernel", dpo.validate,
               dpo.parse_args(["--output_dir", str(tmp_path), "--use_liger_kernel", "true"]))


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
    pairs = dpo.load_pairs(args, tokenizer, args.eval_data_dir, 8)
    dpo.evaluate(model, tokenizer, pairs, args)  # eval mode, no grad, and a generate: every trigger of the bug
    after_eval = lora_gradients(model, tokenizer)
    assert fresh.keys() == after_eval.keys() and len(fresh) == 4 * len(LLAMA_PROJECTIONS)
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-4, atol=1e-6)


def test_reference_is_the_same_base_with_adapters_disabled(dpo_assets, tmp_path):
    args = tiny_args(dpo_assets, tmp_path, "--eval_steps", "0")
    tokenizer = dpo.load_tokenizer(args)
    model = dpo.load_model(args)
    ids = tokenizer(["Question: How do I sort a dictionary by value in ruby?\n\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**ids).logits
    pairs = dpo.load_pairs(args, tokenizer, args.train_data_dir, 64)
    trainer = DPOTrainer(model=model, ref_model=None, args=dpo.build_dpo_config(args), train_dataset=pairs,
                         processing_class=tokenizer, peft_config=dpo.lora_config(args, model))
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    with torch.no_grad():
        for module in trainer.model.modules():  # move the adapters away from their zero start
            if hasattr(module, "lora_B"):
                for weight in module.lora_B.values():
                    weight.weight.fill_(0.01)
        trainer.model.eval()
        assert not torch.allclose(trainer.model(**ids).logits, base_logits)
        with trainer.model.disable_adapter():
            torch.testing.assert_close(trainer.model(**ids).logits, base_logits)


def test_gated_model_message_says_how_to_get_access():
    message = dpo.explain_load_error(OSError("Cannot access gated repo for url ... 401 Client Error"),
                                     "meta-llama/Llama-2-7b-hf", "model_name_or_path")
    assert "license" in message and "HF_TOKEN" in message and "huggingface-cli login" in message
    assert "--model_name_or_path" in message and "--preset tiny" in message


@pytest.mark.parametrize("extra, expected", [
    (["--model_name_or_path", "meta-llama/Llama-2-7b-hf"], r"Hub cannot be reached.*--model_name_or_path"),
    (["--model_name_or_path", "./missing/llama"], r"looks like a local path, but nothing exists there"),
    (["--max_prompt_length", "200", "--max_length", "100"], r"--max_prompt_length \(200\) must be below"),
    (["--optim", "paged_adamw_32bit"], r"--optim paged_adamw_32bit needs a CUDA GPU"),
    (["--beta", "0"], r"--beta must be positive"),
    (["--max_steps", "0"], r"--max_steps must be positive"),
])
def test_bad_settings_stop_before_training(dpo_assets, tmp_path, extra, expected):
    stops_with(expected, dpo.main, ["--preset", "tiny", "--tiny_assets_dir", dpo_assets, "--output_dir",
                                    str(tmp_path), *extra])
    assert not os.path.exists(tmp_path / "eval.json")


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_run_saves_an_adapter_that_loads_back_and_generates(dpo_assets, tmp_path):
    out = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "dpo_llama2_stackexchange.py", "--preset", "tiny", "--output_dir", str(out),
         "--tiny_assets_dir", dpo_assets, "--max_steps", "10", "--eval_steps", "5", "--merge_full_model", "true"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Held-out preference evaluation" in completed.stdout
    result = json.loads((out / "eval.json").read_text())
    for name in ("base", "trained"):
        assert 0.0 <= result[name]["accuracy"] <= 1.0 and isinstance(result[name]["margin"], float)
        assert len(result[name]["generations"]) == 3
    assert result["steps"] == 10 and result["seconds_per_step"] > 0
    base = AutoModelForCausalLM.from_pretrained(os.path.join(dpo_assets, "llama"))
    model = PeftModel.from_pretrained(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["Question: How do I merge two lists in go?\n\nAnswer:"], return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > batch["input_ids"].shape[1]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=1e-3, atol=1e-3)


def test_dpo_learns_the_held_out_preference_with_one_base_model(dpo_assets, tmp_path, monkeypatch):
    """Margin: held-out preference accuracy rises by at least 0.25 over the base's (measured on 2 CPU cores with
    the tiny preset: seed 0 0.500 -> 0.950, seed 1 0.466 -> 0.948), and only one base model is ever loaded."""
    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting_from_pretrained))
    for seed in (0, 1):
        loads.clear()
        result = dpo.main(["--preset", "tiny", "--tiny_assets_dir", dpo_assets, "--output_dir",
                           str(tmp_path / f"seed{seed}"), "--seed", str(seed)])
        base, trained = result["base"], result["trained"]
        print(f"seed {seed}: base accuracy {base['accuracy']:.3f} -> trained {trained['accuracy']:.3f}, "
              f"implicit reward margin {trained['implicit_reward_margin']:.3f}")
        assert len(loads) == 1, loads
        assert trained["accuracy"] >= base["accuracy"] + 0.25
        assert trained["implicit_reward_margin"] > 0.5 and trained["margin"] > base["margin"]


# ---------------------------------------------------------------------------------------------- resume, interrupts
def adapter_weights(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def test_a_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(dpo_assets, tmp_path):
    """Tolerance: adapter weights equal within 1e-5 (measured: bit-identical on CPU)."""
    common = ["--preset", "tiny", "--tiny_assets_dir", dpo_assets, "--max_steps", "20", "--save_steps", "10",
              "--eval_steps", "0", "--num_eval_generations", "0", "--max_eval_samples", "16"]
    straight = tmp_path / "straight"
    dpo.main([*common, "--output_dir", str(straight)])
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]

    crashed = tmp_path / "crashed"  # as if the machine died right after the step-10 checkpoint
    import shutil
    shutil.copytree(straight / "checkpoint-10", crashed / "checkpoint-10")
    result = dpo.main([*common, "--output_dir", str(crashed), "--resume"])
    assert result["steps"] == 20
    state = json.loads((crashed / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    expected, resumed = adapter_weights(straight), adapter_weights(crashed)
    assert expected.keys() == resumed.keys()
    # TRL casts 4-bit models' adapters to bf16 and reloads checkpoints in fp32; both runs must train in fp32 here.
    assert {w.dtype for w in expected.values()} == {w.dtype for w in resumed.values()} == {torch.float32}
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-5)


def test_sigterm_saves_a_checkpoint_prints_how_to_resume_and_exits_non_zero(dpo_assets, tmp_path):
    out = tmp_path / "run"
    code, output = run_then_sigterm("dpo_llama2_stackexchange.py", [
        "--preset", "tiny", "--tiny_assets_dir", dpo_assets, "--output_dir", str(out), "--max_steps", "2000",
        "--save_steps", "0", "--eval_steps", "0"])
    assert code == 143, output[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").exists()
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 2000
    assert f"Stopped by SIGTERM after step {step} of 2000" in output
    assert f"--resume {checkpoints[0]}" in output and "Traceback" not in output


def test_wandb_without_credentials_falls_back_to_offline(no_wandb_credentials, capsys):
    dpo.prepare_tracking(dpo.parse_args(["--report_to", "wandb"]))
    assert os.environ["WANDB_MODE"] == "offline"
    assert "offline" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_explained(dpo_assets, tmp_path):
    stops_with(r"--resume: no checkpoint-N directory in --output_dir", dpo.main,
               ["--preset", "tiny", "--tiny_assets_dir", dpo_assets, "--output_dir", str(tmp_path), "--resume"])


def test_more_bad_settings_stop_before_training(dpo_assets, tmp_path, monkeypatch):
    common = ["--preset", "tiny", "--tiny_assets_dir", dpo_assets]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    stops_with(r"--output_dir .* is not writable", dpo.main, [*common, "--output_dir", str(blocker / "out")])
    stops_with(r"--max_length \(4096\) exceeds the model's context of 128 tokens", dpo.main,
               [*common, "--output_dir", str(tmp_path), "--max_length", "4096"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine where it cannot be imported
    stops_with(r"--load_in_4bit needs bitsandbytes, which cannot run here.*--load_in_4bit false", dpo.main,
               [*common, "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- two processes
def test_two_processes_match_one_process_with_the_same_global_batch(dpo_assets, tmp_path):
    """accelerate launch --num_processes 2 --cpu, 8 pairs per process, against one process with 16: same data per
    step, gradients averaged, so the same result (LoRA dropout off so that both are deterministic). Files are
    written once, by the main process."""
    from conftest import accelerate_launch

    common = ["--preset", "tiny", "--tiny_assets_dir", dpo_assets, "--max_steps", "30", "--eval_steps", "0",
              "--lora_dropout", "0", "--num_eval_generations", "1", "--save_steps", "15"]
    single = dpo.main([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "16"])
    launched = accelerate_launch("dpo_llama2_stackexchange.py",
                                 [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "8"])
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert launched.stdout.count("Held-out preference evaluation") == 1  # the report comes once
    assert launched.stdout.count("Training: 30 DPO steps on 2 x cpu") == 1
    double = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]
    assert double["base"]["accuracy"] == single["base"]["accuracy"]
    for key in ("accuracy", "implicit_reward_accuracy"):
        assert abs(double["trained"][key] - single["trained"][key]) <= 0.02, (key, double["trained"], single["trained"])
    assert double["trained"]["margin"] == pytest.approx(single["trained"]["margin"], rel=0.02)


def test_wandb_offline_run_records_the_evaluation_and_closes_cleanly(dpo_assets, tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "dpo_llama2_stackexchange.py"), "--preset", "tiny", "--tiny_assets_dir",
         dpo_assets, "--output_dir", str(tmp_path / "run"), "--report_to", "wandb", "--max_steps", "10",
         "--eval_steps", "5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    assert "eval_rewards/accuracies" in output and "rewards/margins" in output
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert [p.name.split("_")[0] for p in (run / "files" / "media" / "table").rglob("*.table.json")] == ["generations"]
    assert "ERROR" not in (run / "logs" / "debug.log").read_text()
