"""Speed and memory of dpo_llama2_stackexchange.py.

    python benchmarks/bench_dpo.py                                       # CPU: the tiny preset, end to end
    python benchmarks/bench_dpo.py --arch llama2-7b --device cuda        # GPU: Llama-2-7B shape, 4-bit, length 1024

`--arch llama2-7b` builds Llama-2-7B's architecture with random bf16 weights, saves them to local disk (about
13 GB), and runs the script on it: loaded in 4-bit NF4 through the script's own loading code, LoRA on all
projections, gradient checkpointing, pairs padded out to --max_length tokens. `--num_layers` shrinks the depth
for a quick check of the path (32 is the real model).
"""
import argparse
import json
import os
import random
import tempfile

from common import record, run_script


def build_shape_faithful_model(directory: str, num_layers: int, device: str, pair_tokens: int):
    """Random Llama-2-7B (vocab 32000, hidden 4096, 32 layers) in bf16, a Llama-style tokenizer, and pairs long
    enough that prompt + answer reach `pair_tokens` tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    import dpo_llama2_stackexchange as dpo

    dpo.build_tiny_assets(os.path.join(directory, "tiny"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "tiny", "llama"))
    tokenizer.model_max_length = 4096  # Llama 2's context
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(os.path.join(directory, "llama2-7b"))
    tokenizer.save_pretrained(os.path.join(directory, "llama2-7b"))
    del model
    # Pairs whose prompt + answer + EOS fill just under `pair_tokens`: every step runs at (about) the full length.
    rng = random.Random(0)
    words = "the list value file string loop function returns each item sorted merged".split()
    prompt_tokens = min(256, pair_tokens // 4)
    for data_dir, count in (("data/rl", 64), ("data/evaluation", 8)):
        rows = []
        for _ in range(count):
            text = " ".join(rng.choice(words) for _ in range(2 * pair_tokens))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            question = tokenizer.decode(ids[:prompt_tokens])
            answers = [tokenizer.decode(ids[prompt_tokens : pair_tokens - 16 - shift]) for shift in (0, 8)]
            rows.append({"question": question, "response_j": answers[0], "response_k": answers[1]})
        path = os.path.join(directory, "pairs", data_dir)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "train.jsonl"), "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "llama2-7b"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="DPO steps to time (llama2-7b default: 5)")
    parser.add_argument("--batch_size", type=int, default=1, help="llama2-7b: pairs per step (1, or the default 4)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--num_layers", type=int, default=32, help="llama2-7b depth (32 is the real model)")
    parser.add_argument("--work_dir", default=None, help="where models and outputs go (default: a temp dir)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_dpo_")
    output_dir = os.path.join(work, "run")
    command = ["dpo_llama2_stackexchange.py", "--output_dir", output_dir, "--device", args.device,
               "--report_to", "none", "--eval_steps", "0", "--save_steps", "0"]
    if args.arch == "tiny":
        command += ["--preset", "tiny", "--tiny_assets_dir", os.path.join(work, "tiny")]
        if args.steps:
            command += ["--max_steps", str(args.steps)]
    else:
        build_shape_faithful_model(work, args.num_layers, args.device, args.max_length)
        command += ["--model_name_or_path", os.path.join(work, "llama2-7b"), "--dataset_name",
                    os.path.join(work, "pairs"), "--max_steps", str(args.steps or 5), "--max_length",
                    str(args.max_length), "--max_prompt_length", str(min(512, args.max_length // 2)),
                    "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps",
                    str(args.gradient_accumulation_steps), "--max_eval_samples", "4", "--num_eval_generations", "1",
                    "--max_new_tokens", "8", "--per_device_eval_batch_size", "1", "--warmup_steps", "1"]
        if args.device == "cpu":
            command += ["--optim", "adamw_torch"]
    measured = run_script(command)
    result = json.load(open(os.path.join(output_dir, "eval.json")))
    pairs_per_step = result["args"]["per_device_train_batch_size"] * result["args"]["gradient_accumulation_steps"]
    settings = {"arch": args.arch, "device": args.device, "steps": result["steps"], "pairs_per_step": pairs_per_step,
                "load_in_4bit": result["args"]["load_in_4bit"],
                "gradient_checkpointing": result["args"]["gradient_checkpointing"]}
    figures = {**measured, "seconds_per_step": result["seconds_per_step"],
               "peak_gpu_memory_gib": result["peak_gpu_memory_gib"],
               "accuracy_base": round(result["base"]["accuracy"], 3),
               "accuracy_trained": round(result["trained"]["accuracy"], 3)}
    if args.arch != "tiny":
        settings.update(num_layers=args.num_layers, max_length=args.max_length)
        # Each pair is a chosen and a rejected sequence of close to max_length tokens.
        figures["tokens_per_second"] = round(2 * pairs_per_step * (args.max_length - 16) / result["seconds_per_step"], 1)
    record("dpo", settings, figures)


if __name__ == "__main__":
    main()
