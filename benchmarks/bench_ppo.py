"""Speed and memory of ppo_gpt2_imdb.py.

    python benchmarks/bench_ppo.py                                    # CPU: the tiny preset, end to end
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda          # GPU: GPT-2 124M + DistilBERT 66M shapes

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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "gpt2"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates to time (gpt2 default: 5)")
    parser.add_argument("--batch_size", type=int, default=None, help="prompts per update (default: the script's)")
    parser.add_argument("--work_dir", default=None, help="where models and outputs go (default: a temp dir)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_ppo_")
    output_dir = os.path.join(work, "run")
    command = ["ppo_gpt2_imdb.py", "--output_dir", output_dir, "--device", args.device, "--report_to", "none",
               "--sample_every", "0"]
    if args.arch == "tiny":
        command += ["--preset", "tiny", "--tiny_assets_dir", os.path.join(work, "tiny")]
    else:
        build_shape_faithful_models(work)
        command += ["--model_name_or_path", os.path.join(work, "gpt2"),
                    "--reward_model_name_or_path", os.path.join(work, "distilbert"),
                    "--dataset_name", os.path.join(work, "tiny", "reviews"), "--num_eval_prompts", "16"]
    batch = args.batch_size or (32 if args.arch == "tiny" else 128)
    if args.batch_size:
        command += ["--batch_size", str(args.batch_size)]
    if args.updates or args.arch == "gpt2":
        command += ["--total_episodes", str((args.updates or 5) * batch)]
    measured = run_script(command)
    result = json.load(open(os.path.join(output_dir, "eval.json")))
    settings = {"arch": args.arch, "device": args.device, "batch_size": batch,
                "response_length": result["args"]["response_length"], "updates": result["updates"],
                "num_ppo_epochs": result["args"]["num_ppo_epochs"]}
    figures = {**measured, "seconds_per_update": result["seconds_per_update"],
               "samples_per_second": result["samples_per_second"],
               "peak_gpu_memory_gib": result["peak_gpu_memory_gib"],
               "reward_reference": round(result["reference"]["reward_mean"], 3),
               "reward_trained": round(result["trained"]["reward_mean"], 3)}
    record("ppo", settings, figures)


if __name__ == "__main__":
    main()
