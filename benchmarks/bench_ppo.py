"""Speed and memory of ppo_gpt2_imdb.py.

    python benchmarks/bench_ppo.py                                    # CPU: the tiny preset, end to end
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda          # GPU: GPT-2 124M + DistilBERT 66M shapes
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda --compare_trl_example
    python benchmarks/bench_ppo.py --arch gpt2 --device cuda -- --tf32 false   # flags after --: to every run

`--compare_trl_example` also measures, in the same invocation, the same trainer on the same task laid out as TRL's
own PPO example runs it on one GPU (examples/scripts/ppo/ppo.py: per_device_train_batch_size 64,
gradient_accumulation_steps 1, and PPOConfig's defaults num_mini_batches 1, local_rollout_forward_batch_size 64,
num_ppo_epochs 4, no TF32, TRL's per-update gc.collect() and CUDA cache emptying), and records the ratio of
samples/s.

`--arch gpt2` builds the real architectures (the `gpt2` and `distilbert-base-uncased` configs) with random
weights, since no hub is needed or reachable, saves them to disk and runs the script on them at its default
batch, prompt and response lengths. Speed does not depend on the weights' values.

Every run, the baseline's too, goes through measured_ppo.py, which runs the script as a user does and records
what a user's run does not: each update's two phases (rollout = generation, reward, reference and value passes
and advantages; optimisation = the PPO epochs; means over the updates after the first), the first PPO epoch's
policy ratio error and CUDA graph skips, in OUTPUT_DIR/benchmark.json.
"""
import json
import os
import shutil
import tempfile

from common import (benchmark_parser, fill_vocabulary, measure_layouts, mfu, parameter_count, parse_benchmark_args,
                    profile_layouts, record, run_script)


def build_shape_faithful_models(directory: str):
    """Random-weight GPT-2 124M (vocab 50257) and DistilBERT 66M, with the tiny preset's tokenizers (filled up to
    the real vocabulary sizes) and reviews."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DistilBertConfig, GPT2Config)

    import ppo_gpt2_imdb

    ppo_gpt2_imdb.build_tiny_assets(os.path.join(directory, "tiny"))
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config())  # the `gpt2` checkpoint's shape: 124M parameters
    gpt2.save_pretrained(os.path.join(directory, "gpt2"))
    AutoTokenizer.from_pretrained(os.path.join(directory, "tiny", "gpt2")).save_pretrained(
        os.path.join(directory, "gpt2"))
    fill_vocabulary(os.path.join(directory, "gpt2"), gpt2.config.vocab_size)
    bert = AutoModelForSequenceClassification.from_config(DistilBertConfig(
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    bert.save_pretrained(os.path.join(directory, "distilbert"))
    AutoTokenizer.from_pretrained(os.path.join(directory, "tiny", "distilbert")).save_pretrained(
        os.path.join(directory, "distilbert"))
    fill_vocabulary(os.path.join(directory, "distilbert"), bert.config.vocab_size)


# TRL's example on one GPU (examples/scripts/ppo/ppo.py, its first command): 64 prompts per update in one
# micro-batch; PPOConfig's defaults for the rest (num_mini_batches 1, local_rollout_forward_batch_size 64), no TF32,
# and TRL's loop with its gc.collect() and CUDA cache emptying every update. Still the script's: its models build
# no KV cache in training passes (always on), its prompts come from its own loader.
TRL_EXAMPLE_BATCH = 64
TRL_EXAMPLE_FLAGS = ["--gradient_accumulation_steps", "1", "--num_mini_batches", "1", "--tf32", "false",
                     "--bf16_autocast", "false", "--static_cache_generation", "false", "--compile_ppo_epochs", "false",
                     "--trl_memory_freeing"]  # measured_ppo.py's: TRL's loop with its freeing
MEASURED = os.path.join("benchmarks", "measured_ppo.py")


def script_command(args, work: str, output_dir: str, batch_size: int, updates, script: str) -> list:
    """The command line of one run of `script` through measured_ppo.py (flags added after it win)."""
    command = [MEASURED, "--script", script, "--output_dir", output_dir, "--device", args.device, "--report_to", "none",
               "--sample_every", "0", "--save_steps", "0", "--batch_size", str(batch_size)]
    if args.arch == "tiny":
        command += ["--preset", "tiny", "--tiny_assets_dir", os.path.join(work, "tiny")]
    else:
        command += ["--model_name_or_path", os.path.join(work, "gpt2"),
                    "--reward_model_name_or_path", os.path.join(work, "distilbert"),
                    "--dataset_name", os.path.join(work, "tiny", "reviews"), "--num_eval_prompts", "16"]
    return command + (["--total_episodes", str(updates * batch_size)] if updates else [])


def profiled_run(args, work: str, name: str, batch_size: int, flags: list[str], profile: str) -> dict:
    """A run of `name`'s layout up to update --profile_step, with that update profiled (see step_timer.py)."""
    output_dir = os.path.join(work, f"{name}-profiled")
    shutil.rmtree(output_dir, ignore_errors=True)
    return run_script(script_command(args, work, output_dir, batch_size, args.profile_step, "ppo_gpt2_imdb.py")
                      + flags, profile)


def measure(args, work: str, name: str, batch_size: int, flags: list[str], script: str = "ppo_gpt2_imdb.py") -> dict:
    """Run `script` once with `batch_size` prompts per update and the given flags; record and return the row."""
    output_dir = os.path.join(work, name)
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run each time (the scripts refuse to overwrite one)
    updates = args.updates or (5 if args.arch == "gpt2" else None)
    measured = run_script(script_command(args, work, output_dir, batch_size, updates, script) + flags)
    result = json.load(open(os.path.join(output_dir, "eval.json")))
    extra = json.load(open(os.path.join(output_dir, "benchmark.json")))
    run_args = result["args"]
    settings = {"arch": args.arch, "device": args.device, "layout": name, "batch_size": run_args["batch_size"],
                "micro_batch": run_args["batch_size"] // run_args["gradient_accumulation_steps"],
                "num_mini_batches": run_args["num_mini_batches"], "num_ppo_epochs": run_args["num_ppo_epochs"],
                "response_length": run_args["response_length"], "tf32": run_args["tf32"] and args.device == "cuda",
                "free_memory_each_update": "--trl_memory_freeing" in flags, "updates": result["updates"]}
    for lever in ("bf16_autocast", "static_cache_generation", "compile_ppo_epochs"):  # they act on a GPU only
        # Older copies: absent, or compile_ppo_epochs a mode's name ("none": off)
        settings[lever] = run_args.get(lever) not in (None, False, "none") and args.device == "cuda"
    steady = measured["steady_seconds_per_step"]
    samples = run_args["batch_size"]
    figures = {"wall_seconds": measured["wall_seconds"], "peak_rss_gib": measured["peak_rss_gib"],
               "first_update_seconds": measured["first_step_seconds"], "steady_seconds_per_update": steady,
               "samples_per_second": round(samples / steady, 2),
               "rollout_seconds_per_update": extra["rollout_seconds_per_update"],
               "optimisation_seconds_per_update": extra["optimisation_seconds_per_update"],
               # The first update's phases: where its compilation went
               "first_rollout_seconds": extra["first_rollout_seconds"],
               "first_optimisation_seconds": extra["first_optimisation_seconds"],
               # A pass over IMDB's training reviews (about 195 updates of 128), warm-up and compilation included.
               "full_pass_seconds": round(measured["first_step_seconds"]
                                          + (FULL_PASS_PROMPTS / samples - 1) * steady, 1),
               "peak_gpu_memory_gib": result["peak_gpu_memory_gib"],
               "policy_ratio_error": extra["policy_ratio_error"],
               "cuda_graph_skips": extra["cuda_graph_skips"],  # compiled graphs run without CUDA graphs
               "mfu": mfu(ppo_flops_per_update(work, args.arch, run_args) / steady) if args.arch != "tiny" else None,
               "reward_reference": round(result["reference"]["reward_mean"], 3),
               "reward_trained": round(result["trained"]["reward_mean"], 3)}
    return record("ppo", settings, figures)


FULL_PASS_PROMPTS = 195 * 128  # IMDB's 25,000 training reviews less those of 200 characters or fewer


def ppo_flops_per_update(work: str, arch: str, run_args: dict) -> float:
    """Model FLOPs of one update by the usual counts: 2N per token for each forward pass (generation, reference,
    value and reward in the rollout) and 6N per token for each forward + backward (policy and value, every PPO
    epoch), over prompt + response tokens (prompts at their longest, as batches pad them)."""
    policy = parameter_count(os.path.join(work, arch))
    value = parameter_count(os.path.join(work, arch), classifier=True)
    reward = parameter_count(os.path.join(work, "distilbert"), classifier=True)
    tokens = run_args["batch_size"] * (run_args["prompt_max_tokens"] + run_args["response_length"])
    return tokens * (2 * policy * 2 + 2 * value + 2 * reward + run_args["num_ppo_epochs"] * 6 * (policy + value))


def compare(args, name: str, new: dict, old: dict) -> dict:
    """One row with the ratios of two rows measured in this invocation (new over old)."""
    new_figures, old_figures = new["figures"], old["figures"]
    figures = {"samples_per_second_ratio": round(new_figures["samples_per_second"]
                                                 / old_figures["samples_per_second"], 2),
               "full_pass_seconds_old": old_figures["full_pass_seconds"],
               "full_pass_seconds_new": new_figures["full_pass_seconds"]}
    if new_figures["peak_gpu_memory_gib"] and old_figures["peak_gpu_memory_gib"]:
        figures["peak_gpu_memory_ratio"] = round(new_figures["peak_gpu_memory_gib"]
                                                 / old_figures["peak_gpu_memory_gib"], 3)
    return record("ppo", {"arch": args.arch, "device": args.device, "comparison": name}, figures)


def main():
    parser = benchmark_parser(__doc__, "ppo_gpt2_imdb.py", ["tiny", "gpt2"])
    parser.add_argument("--updates", type=int, default=None, help="PPO updates to time (gpt2 default: 5)")
    parser.add_argument("--batch_size", type=int, default=None, help="prompts per update (default: the script's)")
    parser.add_argument("--compare_trl_example", action="store_true",
                        help="also measure TRL's one-GPU example layout on the same task and record the speed-up")
    args, script_flags, variants = parse_benchmark_args(parser)
    work = args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_ppo_")
    if args.arch == "gpt2":
        build_shape_faithful_models(work)
    batch = args.batch_size or (32 if args.arch == "tiny" else 128)
    old = None
    if args.baseline:  # first, so that the new script cannot warm anything up for it
        old = measure_layouts("ppo", args, [("baseline", script_flags)], lambda name, flags: measure(
            args, work, name, batch, flags, os.path.join(args.baseline, "ppo_gpt2_imdb.py"))).get("baseline")
    layouts = [(args.name, script_flags)] + [(name, script_flags + flags) for name, flags in variants]
    rows = measure_layouts("ppo", args, layouts, lambda name, flags: measure(args, work, name, batch, flags), old,
                           lambda name, new, base: compare(args, name, new, base))
    if args.compare_trl_example and args.name in rows:
        theirs = measure(args, work, "trl-example", TRL_EXAMPLE_BATCH, TRL_EXAMPLE_FLAGS + script_flags)
        speedup = rows[args.name]["figures"]["samples_per_second"] / theirs["figures"]["samples_per_second"]
        record("ppo", {"arch": args.arch, "device": args.device, "comparison": "script-defaults vs trl-example"},
               {"samples_per_second_ratio": round(speedup, 2), "target": 1.5, "met": speedup >= 1.5})
    if args.profile_step:  # last: the timed rows are in even if time runs out here
        profile_layouts("ppo", args, layouts,
                        lambda name, flags, profile: profiled_run(args, work, name, batch, flags, profile))


if __name__ == "__main__":
    main()
