"""Speed and memory of ppo_gpt2_imdb.py.

    python benchmarks/bench_ppo.py                                    # CPU: the tiny preset, end to end
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda          # GPU: GPT-2 124M + DistilBERT 66M shapes
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda --compare_trl_example

`--compare_trl_example` also measures, in the same invocation, the layout of TRL's own PPO example
(examples/scripts/ppo: per_device_train_batch_size 1 with gradient_accumulation_steps 64, i.e. 64 prompts per update
in micro-batches of 1) and records the ratio of samples/s.

`--arch gpt2` builds the real architectures (the `gpt2` and `distilbert-base-uncased` configs) with random
weights, since no hub is needed or reachable, saves them to disk and runs the script on them at its default
batch, prompt and response lengths. Speed does not depend on the weights' values.
"""
import argparse
import json
import os
import tempfile

from common import record, run_script


def build_shape_faithful_models(directory: str):
    """Random-weight GPT-2 124M (vocab 50257) and DistilBERT 66M, with the tiny preset's tokenizers and reviews."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DistilBertConfig, GPT2Config)

    import ppo_gpt2_imdb

    ppo_gpt2_imdb.build_tiny_assets(os.path.join(directory, "tiny"))
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config())  # the `gpt2` checkpoint's shape: 124M parameters
    gpt2.save_pretrained(os.path.join(directory, "gpt2"))
    AutoTokenizer.from_pretrained(os.path.join(directory, "tiny", "gpt2")).save_pretrained(os.path.join(directory, "gpt2"))
    bert = AutoModelForSequenceClassification.from_config(DistilBertConfig(
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    bert.save_pretrained(os.path.join(directory, "distilbert"))
    AutoTokenizer.from_pretrained(os.path.join(directory, "tiny", "distilbert")).save_pretrained(
        os.path.join(directory, "distilbert"))


def measure(args, work: str, name: str, batch_size: int, accumulation: int) -> dict:
    """Run the script once with the given rollout batch and gradient accumulation; record and return the row."""
    output_dir = os.path.join(work, name)
    command = ["ppo_gpt2_imdb.py", "--output_dir", output_dir, "--device", args.device, "--report_to", "none",
               "--sample_every", "0", "--save_steps", "0", "--batch_size", str(batch_size),
               "--gradient_accumulation_steps", str(accumulation)]
    if args.arch == "tiny":
        command += ["--preset", "tiny", "--tiny_assets_dir", os.path.join(work, "tiny")]
        if accumulation > 1:
            command += ["--num_mini_batches", "1"]  # TRL 1.12 cannot combine mini-batches with accumulation
    else:
        command += ["--model_name_or_path", os.path.join(work, "gpt2"),
                    "--reward_model_name_or_path", os.path.join(work, "distilbert"),
                    "--dataset_name", os.path.join(work, "tiny", "reviews"), "--num_eval_prompts", "16"]
    if args.updates or args.arch == "gpt2":
        command += ["--total_episodes", str((args.updates or 5) * batch_size)]
    measured = run_script(command)
    result = json.load(open(os.path.join(output_dir, "eval.json")))
    settings = {"arch": args.arch, "device": args.device, "layout": name, "batch_size": batch_size,
                "micro_batch": batch_size // accumulation, "response_length": result["args"]["response_length"],
                "updates": result["updates"], "num_ppo_epochs": result["args"]["num_ppo_epochs"]}
    figures = {**measured, "seconds_per_update": result["seconds_per_update"],
               "samples_per_second": result["samples_per_second"],
               "peak_gpu_memory_gib": result["peak_gpu_memory_gib"],
               "reward_reference": round(result["reference"]["reward_mean"], 3),
               "reward_trained": round(result["trained"]["reward_mean"], 3)}
    return record("ppo", settings, figures)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "gpt2"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates to time (gpt2 default: 5)")
    parser.add_argument("--batch_size", type=int, default=None, help="prompts per update (default: the script's)")
    parser.add_argument("--compare_trl_example", action="store_true",
                        help="also measure TRL's example layout (64 prompts in micro-batches of 1) and the speed-up")
    parser.add_argument("--work_dir", default=None, help="where models and outputs go (default: a temp dir)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_ppo_")
    if args.arch == "gpt2":
        build_shape_faithful_models(work)
    ours = measure(args, work, "script-defaults", args.batch_size or (32 if args.arch == "tiny" else 128), 1)
    if args.compare_trl_example:
        theirs = measure(args, work, "trl-example", 64, 64)
        speedup = ours["figures"]["samples_per_second"] / theirs["figures"]["samples_per_second"]
        record("ppo", {"arch": args.arch, "device": args.device, "comparison": "script-defaults vs trl-example"},
               {"samples_per_second_ratio": round(speedup, 2), "target": 1.5, "met": speedup >= 1.5})


if __name__ == "__main__":
    main()
