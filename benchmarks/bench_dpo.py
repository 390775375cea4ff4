"""Speed and memory of dpo_llama2_stackexchange.py.

    python benchmarks/bench_dpo.py                                       # CPU: the tiny preset, end to end
    python benchmarks/bench_dpo.py --arch llama2-7b --device cuda        # GPU: Llama-2-7B shape, 4-bit, length 1024

`--arch llama2-7b` builds Llama-2-7B's architecture with random bf16 weights, saves them to local disk (about
13 GB), and runs the script on it: loaded in 4-bit NF4 through the script's own loading code, LoRA on all
projections, gradient checkpointing, pairs padded out to --max_length tokens. `--num_layers` shrinks the depth
for a quick check of the path (32 is the real model).
"""
import json
import math
import os
import random
import shutil
import tempfile

from common import (benchmark_parser, fill_vocabulary, measure_layouts, mfu, parameter_count, parse_benchmark_args,
                    profile_layouts, record, run_script)


def build_shape_faithful_model(directory: str, num_layers: int, device: str, pair_tokens: int, lengths: str):
    """Random Llama-2-7B (vocab 32000, hidden 4096, 32 layers) in bf16, the tiny Llama-style tokenizer (filled up to
    32000 ids), and pairs long enough that prompt + answer reach `pair_tokens` tokens."""
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
    fill_vocabulary(os.path.join(directory, "llama2-7b"), config.vocab_size)
    del model
    # "full": pairs whose prompt + answer + EOS fill just under `pair_tokens`, so every step runs at (about) the
    # full length. "spread": lengths spread like real Stack Exchange pairs, many short and a tail to the limit
    # (log-normal, median about a fifth of the limit), where padding is most of a naive batch.
    rng = random.Random(0)
    words = "the list value file string loop function returns each item sorted merged".split()
    text = " ".join(rng.choice(words) for _ in range(4 * pair_tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for data_dir, count in (("data/rl", 128), ("data/evaluation", 8)):
        rows = []
        for _ in range(count):
            if lengths == "full":
                prompt_tokens = min(256, pair_tokens // 4)
                answer_tokens = pair_tokens - 16 - prompt_tokens
            else:
                total = min(pair_tokens - 16, max(24, int(rng.lognormvariate(math.log(pair_tokens / 5), 0.8))))
                prompt_tokens = max(8, min(total // 3, pair_tokens // 2 - 8))
                answer_tokens = total - prompt_tokens
            start = rng.randrange(0, len(ids) - pair_tokens)
            question = tokenizer.decode(ids[start : start + prompt_tokens])
            answers = [tokenizer.decode(ids[start + prompt_tokens : start + prompt_tokens + answer_tokens - shift])
                       for shift in (0, min(8, answer_tokens // 4))]
            rows.append({"question": question, "response_j": answers[0], "response_k": answers[1]})
        path = os.path.join(directory, "pairs", data_dir)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "train.jsonl"), "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


def script_command(args, work: str, output_dir: str, script: str) -> list:
    """The command line of one run (flags added after it win)."""
    command = [script, "--output_dir", output_dir, "--device", args.device, "--report_to", "none", "--eval_steps",
               "0", "--save_steps", "0", "--logging_steps", "1"]
    if args.arch == "tiny":
        command += ["--preset", "tiny", "--tiny_assets_dir", os.path.join(work, "tiny")]
        if args.steps:
            command += ["--max_steps", str(args.steps)]
    else:
        command += ["--model_name_or_path", os.path.join(work, "llama2-7b"), "--dataset_name",
                    os.path.join(work, "pairs"), "--max_steps", str(args.steps or 5), "--max_length",
                    str(args.max_length), "--max_prompt_length", str(min(512, args.max_length // 2)),
                    "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps",
                    str(args.gradient_accumulation_steps), "--max_eval_samples", "2", "--num_eval_generations", "1",
                    "--max_new_tokens", "4", "--per_device_eval_batch_size", "1", "--warmup_steps", "1"]
        if args.device == "cpu":
            command += ["--optim", "adamw_torch"]
    return command


def profiled_run(args, work: str, name: str, flags: list[str], profile: str) -> dict:
    """A run of `name`'s layout up to step --profile_step, with that step profiled (see step_timer.py)."""
    output_dir = os.path.join(work, f"{name}-profiled")
    shutil.rmtree(output_dir, ignore_errors=True)
    command = script_command(args, work, output_dir, "dpo_llama2_stackexchange.py")
    return run_script(command + flags + ["--max_steps", str(args.profile_step)], profile)


def measure(args, work: str, name: str, flags: list[str], script: str = "dpo_llama2_stackexchange.py") -> dict:
    """Run `script` once with the given flags; record and return the row."""
    output_dir = os.path.join(work, name)
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run each time (the scripts refuse to overwrite one)
    measured = run_script(script_command(args, work, output_dir, script) + flags)  # later flags win
    result = json.load(open(os.path.join(output_dir, "eval.json")))
    run_args = result["args"]
    pairs_per_step = run_args["per_device_train_batch_size"] * run_args["gradient_accumulation_steps"]
    settings = {"arch": args.arch, "device": args.device, "layout": name, "lengths": args.lengths,
                "steps": result["steps"], "pairs_per_step": pairs_per_step,
                "micro_batch": run_args["per_device_train_batch_size"], "load_in_4bit": run_args["load_in_4bit"],
                "gradient_checkpointing": run_args["gradient_checkpointing"]}
    settings["use_liger_kernel"], settings["tf32"] = run_args.get("use_liger_kernel"), run_args.get("tf32")
    steady = measured["steady_seconds_per_step"]
    figures = {"wall_seconds": measured["wall_seconds"], "peak_rss_gib": measured["peak_rss_gib"],
               "first_step_seconds": measured["first_step_seconds"], "steady_seconds_per_step": steady,
               "peak_gpu_memory_gib": result["peak_gpu_memory_gib"], "first_loss": measured["first_loss"],
               "accuracy_base": round(result["base"]["accuracy"], 3),
               "accuracy_trained": round(result["trained"]["accuracy"], 3)}
    if args.arch != "tiny":
        settings.update(num_layers=args.num_layers, max_length=args.max_length)
        # Real (non-pad) tokens of chosen and rejected, as the run counted them, per step: every layout of one
        # invocation draws the same pairs in the same order.
        tokens_per_step = result["train_tokens"] / result["steps_this_run"]
        figures["tokens_per_second"] = round(tokens_per_step / steady, 1)
        # 8N FLOPs per token with gradient checkpointing (reference forward, forward, recomputed forward, backward
        # to the inputs: the 4-bit base gets no weight gradients), 6N without.
        flops_per_token = (8 if run_args["gradient_checkpointing"] else 6) * parameter_count(
            os.path.join(work, "llama2-7b"))
        figures["mfu"] = mfu(flops_per_token * tokens_per_step / steady)
    return record("dpo", settings, figures)


def main():
    parser = benchmark_parser(__doc__, "dpo_llama2_stackexchange.py", ["tiny", "llama2-7b"])
    parser.add_argument("--steps", type=int, default=None, help="DPO steps to time (llama2-7b default: 5)")
    parser.add_argument("--batch_size", type=int, default=1, help="llama2-7b: pairs per forward pass")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--lengths", choices=["full", "spread"], default="full",
                        help="llama2-7b: every pair at the full length, or lengths spread like real pairs")
    parser.add_argument("--num_layers", type=int, default=32, help="llama2-7b depth (32 is the real model)")
    args, script_flags, variants = parse_benchmark_args(parser)
    work = args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_dpo_")
    if args.arch != "tiny" and not os.path.exists(os.path.join(work, "llama2-7b", "config.json")):
        build_shape_faithful_model(work, args.num_layers, args.device, args.max_length, args.lengths)
    old = None
    if args.baseline:  # first, so that the new script cannot warm anything up for it
        old = measure_layouts("dpo", args, [("baseline", script_flags)], lambda name, flags: measure(
            args, work, name, flags, os.path.join(args.baseline, "dpo_llama2_stackexchange.py"))).get("baseline")
    layouts = [(args.name, script_flags)] + [(name, script_flags + flags) for name, flags in variants]
    rows = measure_layouts("dpo", args, layouts, lambda name, flags: measure(args, work, name, flags), old,
                           lambda name, new, base: compare(args, name, new, base))
    for name, _ in variants:  # each lever against the current defaults, measured in this invocation
        if name in rows and args.name in rows:
            compare(args, f"{name} vs {args.name}", rows[name], rows[args.name])
    if args.profile_step:  # last: the timed rows are in even if time runs out here
        profile_layouts("dpo", args, layouts, lambda name, flags, profile: profiled_run(args, work, name, flags,
                                                                                        profile))


def compare(args, name: str, new: dict, old: dict) -> dict:
    """One row with the ratios of two rows measured in this invocation (new over old)."""
    figures = {"steady_step_speedup": round(old["figures"]["steady_seconds_per_step"]
                                            / new["figures"]["steady_seconds_per_step"], 2)}
    if new["figures"]["peak_gpu_memory_gib"] and old["figures"]["peak_gpu_memory_gib"]:
        figures["peak_gpu_memory_ratio"] = round(new["figures"]["peak_gpu_memory_gib"]
                                                 / old["figures"]["peak_gpu_memory_gib"], 3)
    return record("dpo", {"arch": args.arch, "device": args.device, "comparison": name}, figures)


if __name__ == "__main__":
    main()
