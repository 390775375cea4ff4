"""Speed and memory of ppo_gpt2_imdb.py.

    python benchmarks/bench_ppo.py                                    # CPU: the tiny preset, end to end
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda          # GPU: GPT-2 124M + DistilBERT 66M shapes
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda --compare_trl_example
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda -- --tf32 false   # flags after -- go to the script, to both runs

`--compare_trl_example` also measures, in the same invocation, the same trainer on the same task laid out as TRL's
own PPO example runs it on one GPU (examples/scripts/ppo/ppo.py: per_device_train_batch_size 64,
gradient_accumulation_steps 1, and PPOConfig's defaults num_mini_batches 1, local_rollout_forward_batch_size 64,
num_ppo_epochs 4, no TF32, TRL's per-update gc.collect() and CUDA cache emptying), and records the ratio of
samples/s.

`--arch gpt2` builds the real architectures (the `gpt2` and `distilbert-base-uncased` configs) with random
weights, since no hub is needed or reachable, saves them to disk and runs the script on them at its default
batch, prompt and response lengths. Speed does not depend on the weights' values.

Each update is timed in two phases (the script logs them as time/rollout_seconds and time/optimisation_seconds):
rollout = generation, reward, reference and value passes and advantages; optimisation = the PPO epochs. The
figures are means over the updates after the first (warm-up).
"""
import argparse
import json
import os
import sys
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


# TRL's example on one GPU (examples/scripts/ppo/ppo.py, its first command): 64 prompts per update in one
# micro-batch; PPOConfig's defaults for the rest (num_mini_batches 1, local_rollout_forward_batch_size 64), no TF32,
# and TRL's loop as it is, with its gc.collect() and CUDA cache emptying every update.
TRL_EXAMPLE_BATCH = 64
TRL_EXAMPLE_FLAGS = ["--gradient_accumulation_steps", "1", "--num_mini_batches", "1", "--tf32", "false",
                     "--free_memory_each_update", "true"]


def measure(args, work: str, name: str, batch_size: int, flags: list[str]) -> dict:
    """Run the script once with `batch_size` prompts per update and the given flags; record and return the row."""
    output_dir = os.path.join(work, name)
    command = ["ppo_gpt2_imdb.py", "--output_dir", output_dir, "--device", args.device, "--report_to", "none",
               "--sample_every", "0", "--save_steps", "0", "--batch_size", str(batch_size)]
    if args.arch == "tiny":
        command += ["--preset", "tiny", "--tiny_assets_dir", os.path.join(work, "tiny")]
    else:
        command += ["--model_name_or_path", os.path.join(work, "gpt2"),
                    "--reward_model_name_or_path", os.path.join(work, "distilbert"),
                    "--dataset_name", os.path.join(work, "tiny", "reviews"), "--num_eval_prompts", "16"]
    if args.updates or args.arch == "gpt2":
        command += ["--total_episodes", str((args.updates or 5) * batch_size)]
    measured = run_script(command + flags)  # later flags win
    result = json.load(open(os.path.join(output_dir, "eval.json")))
    run_args = result["args"]
    settings = {"arch": args.arch, "device": args.device, "layout": name, "batch_size": run_args["batch_size"],
                "micro_batch": run_args["batch_size"] // run_args["gradient_accumulation_steps"],
                "num_mini_batches": run_args["num_mini_batches"], "num_ppo_epochs": run_args["num_ppo_epochs"],
                "response_length": run_args["response_length"], "tf32": run_args["tf32"] and args.device == "cuda",
                "free_memory_each_update": run_args["free_memory_each_update"], "updates": result["updates"]}
    figures = {**measured, "seconds_per_update": result["seconds_per_update"],
               "rollout_seconds_per_update": result["rollout_seconds_per_update"],
               "optimisation_seconds_per_update": result["optimisation_seconds_per_update"],
               "samples_per_second": result["samples_per_second"],
               "peak_gpu_memory_gib": result["peak_gpu_memory_gib"],
               "reward_reference": round(result["reference"]["reward_mean"], 3),
               "reward_trained": round(result["trained"]["reward_mean"], 3)}
    return record("ppo", settings, figures)


def main():
    argv = sys.argv[1:]
    own, script_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "gpt2"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates to time (gpt2 default: 5)")
    parser.add_argument("--batch_size", type=int, default=None, help="prompts per update (default: the script's)")
    parser.add_argument("--compare_trl_example", action="store_true",
                        help="also measure TRL's one-GPU example layout on the same task and record the speed-up")
    parser.add_argument("--work_dir", default=None, help="where models and outputs go (default: a temp dir)")
    args = parser.parse_args(own)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_ppo_")
    if args.arch == "gpt2":
        build_shape_faithful_models(work)
    ours = measure(args, work, "script-defaults", args.batch_size or (32 if args.arch == "tiny" else 128),
                   script_flags)
    if args.compare_trl_example:
        theirs = measure(args, work, "trl-example", TRL_EXAMPLE_BATCH, TRL_EXAMPLE_FLAGS + script_flags)
        speedup = ours["figures"]["samples_per_second"] / theirs["figures"]["samples_per_second"]
        record("ppo", {"arch": args.arch, "device": args.device, "comparison": "script-defaults vs trl-example"},
               {"samples_per_second_ratio": round(speedup, 2), "target": 1.5, "met": speedup >= 1.5})


if __name__ == "__main__":
    main()
