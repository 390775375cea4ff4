"""PPO fine-tunes GPT-2 (lvwerra/gpt2-imdb) to write positive IMDB movie reviews.

The policy continues the first 2-8 tokens of an IMDB review; a DistilBERT sentiment classifier
(lvwerra/distilbert-imdb) scores prompt + continuation, and its POSITIVE logit is the reward. TRL's PPO trainer
(trl 1.12, `trl.experimental.ppo`) trains the policy and a GPT-2 value model, with a KL penalty towards a frozen
copy of the starting policy.

    python ppo_gpt2_imdb.py --preset tiny --output_dir outputs/tiny   # offline, about a minute on a laptop CPU
    python ppo_gpt2_imdb.py                                           # the real run (GPU, hub access)
    python ppo_gpt2_imdb.py --learning_rate 1e-5 --config my.yaml     # any constant below, from CLI or YAML

The constants in `Args` are the interface: edit them, or override any with `--name value` or a YAML file. A preset
changes only defaults and prints what it changed. The file is also a notebook (`# %%` cells, percent format): open
it in VS Code, PyCharm or Jupyter (`jupytext --to notebook ppo_gpt2_imdb.py`); "Run all" trains with the constants
as edited here. Read down to the first appendix for the whole recipe; the appendices are machinery.
"""

# %% Imports (each appendix imports what only it needs)
import signal
import sys

if __name__ == "__main__" and "ipykernel" not in sys.modules:  # Ctrl-C while the libraries load: no traceback
    def stopped_while_loading(signum, frame):
        print("\nSIGINT: stopped at once. Nothing was trained yet.", file=sys.stderr)
        raise SystemExit(130)  # as after training begins (Appendix C)

    signal.signal(signal.SIGINT, stopped_while_loading)

import copy
import logging
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental prints a warning on import
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # a CPU kernels notice; no 4-bit here
warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|generation_config).*", category=FutureWarning)

import numpy as np
import torch
from accelerate import PartialState
from datasets import load_dataset
from datasets.utils.logging import disable_progress_bar
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging as transformers_logging
from trl.experimental.ppo import PPOConfig

disable_progress_bar()  # datasets' per-map bars; the script says in one line what each step kept
transformers_logging.set_verbosity_error()  # load reports and deprecation notices; errors still show
transformers_logging.disable_progress_bar()  # weight-loading bars (training's own bar is on: disable_tqdm)
SCRIPT = "ppo_gpt2_imdb.py"


def arg(default, help):
    """A dataclass field whose help text shows in `--help`."""
    return field(default=default, metadata={"help": help})


# %% Settings: the constants of a run. Defaults follow TRL's gpt2-sentiment example.
@dataclass
class Args:
    preset: Optional[str] = arg(None, "'tiny': build tiny local models and data and run offline on a CPU")
    seed: int = arg(0, "seed for data sampling, initialisation and generation: a run is reproducible from it")
    output_dir: str = arg("outputs/ppo_gpt2_imdb", "where the policy, value model, tokenizer and eval.json go")

    # Models
    model_name_or_path: str = arg("lvwerra/gpt2-imdb", "policy to train: hub id or local directory")
    value_model_name_or_path: Optional[str] = arg(None, "value model backbone (scalar head added); None: the policy")
    reward_model_name_or_path: str = arg("lvwerra/distilbert-imdb", "sentiment classifier giving the reward")
    positive_label: str = arg("POSITIVE", "label name (in the classifier's config.label2id) whose logit is the reward")
    reward_batch_size: int = arg(128, "texts per classifier forward pass")

    # Data
    dataset_name: str = arg("stanfordnlp/imdb", "review dataset: hub id or local directory")
    dataset_train_split: str = arg("train", "split the training prompts come from")
    dataset_eval_split: str = arg("test", "split the held-out evaluation prompts come from")
    text_column: str = arg("text", "column holding the review text")
    min_review_chars: int = arg(200, "keep only reviews longer than this many characters")
    prompt_min_tokens: int = arg(2, "shortest prompt, in policy tokens")
    prompt_max_tokens: int = arg(8, "longest prompt, in policy tokens (each prompt's length is drawn uniformly)")
    num_eval_prompts: int = arg(128, "held-out prompts scored before and after training")
    eval_batch_size: int = arg(64, "prompts per generation batch in evaluation (kept apart from training's batch)")
    dataset_num_proc: Optional[int] = arg(None, "processes for dataset tokenisation; None: one")

    # Generation (TRL's PPO trainer always samples with top_k=0, top_p=1.0)
    response_length: int = arg(16, "new tokens per response")
    temperature: float = arg(1.0, "sampling temperature for rollouts and evaluation")

    # Algorithm: PPO
    learning_rate: float = arg(1.41e-5, "Adam learning rate for the policy and value model")
    total_episodes: Optional[int] = arg(None, "prompts to train on in total; None: one pass over the training set")
    batch_size: int = arg(128, "prompts per PPO update (rollout batch), per process")
    num_mini_batches: int = arg(1, "mini-batches the rollout batch is split into for each PPO epoch")
    gradient_accumulation_steps: int = arg(1, "micro-batches per mini-batch (lowers memory; same result)")
    num_ppo_epochs: int = arg(4, "optimisation passes over each rollout batch")
    kl_coef: float = arg(0.2, "weight of the per-token KL penalty to the reference (the example's initial value)")
    cliprange: float = arg(0.2, "PPO policy ratio clip")
    cliprange_value: float = arg(0.2, "value prediction clip")
    vf_coef: float = arg(0.1, "value loss weight")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")

    # Tracking and saving
    report_to: str = arg("wandb", "wandb, tensorboard or none (wandb without credentials logs offline to ./wandb)")
    wandb_project: str = arg("ppo_gpt2_imdb", "wandb project the run is logged to")
    wandb_entity: Optional[str] = arg(None, "wandb team or user; None: your default entity")
    run_name: Optional[str] = arg(None, "run name on the tracker; None: generated")
    logging_steps: int = arg(1, "log metrics every N PPO updates, and at the last")
    sample_every: int = arg(10, "log a table of (prompt, response, reward) samples every N PPO updates; 0: never")
    save_steps: int = arg(50, "save a resumable checkpoint every N PPO updates; 0: none (Ctrl-C still saves one)")
    resume: Optional[str] = arg(None, "continue from a checkpoint: 'latest' (bare --resume) or a checkpoint dir")
    overwrite_output_dir: bool = arg(False, "start over in an output dir that holds a finished or unfinished run "
                                     "(its eval.json, saved models and checkpoints are deleted)")
    save_value_model: bool = arg(True, "also save the value model (to OUTPUT_DIR/value_model)")
    push_to_hub: bool = arg(False, "push the trained policy and tokenizer to the hub")
    hub_model_id: Optional[str] = arg(None, "hub repo for push_to_hub; None: the output dir's name")

    # System and speed
    device: str = arg("auto", "auto (CUDA when present), cuda or cpu")
    tf32: bool = arg(True, "on an Ampere or newer GPU, run fp32 matmuls on TF32 tensor cores (TRL's PPO ignores bf16)")
    free_memory_each_update: bool = arg(False, "let TRL run gc.collect() and empty the CUDA cache several times "
                                        "per update: lower peak memory for big models, slow for GPT-2")
    # The GPU layout (H200, GPT-2 shapes, 2026-11-27): these three together 0.236 s per update against 0.526 s for
    # the eager fp32 layout (2.23x) and 0.681 s for the old code 3f5fb14 (2.89x) in the same call; 8.9 GiB against
    # 12.4 and 12.8; one IMDB pass 100 s, its cold compilation (54 s) included, against 103 and 133 s;
    # mean |ratio - 1| of the first PPO epoch 2.0e-3 (fp32: 1.3e-4; PPO clips at 0.2). README: Speed on a GPU.
    # A run without a GPU turns the last two off (WITHOUT_A_GPU), as does --preset tiny.
    bf16_autocast: bool = arg(True, "GPU: the PPO epochs' forward passes under bf16 autocast (H200, compiled with "
                              "the static cache: 0.35 s per update in fp32 in one call, 0.23 s under autocast in "
                              "another; eager it was slower, 0.28 -> 0.32 s). No effect on a CPU")
    static_cache_generation: bool = arg(True, "rollouts decode into one static KV cache, compiled on a GPU (about "
                                        "12-15 s once on an H200; rollout 0.23 -> 0.13 s per update). Off "
                                        "without a GPU")
    compile_decode: str = arg("reduce-overhead", "with --static_cache_generation on a GPU, how the decode compiles: "
                              "reduce-overhead (transformers' own) or cudagraphs (the eager kernels replayed as CUDA "
                              "graphs: traced in 4-7 s, rollout 0.121 s per update against 0.127), or another "
                              "--compile_ppo_epochs mode. A CPU decodes uncompiled")
    compile_ppo_epochs: Optional[str] = arg("reduce-overhead", "torch.compile mode for the policy and value passes "
                                            "of the PPO epochs: default, reduce-overhead (GPU: CUDA graphs too; "
                                            "H200 35-55 s once), max-autotune, or cudagraphs (GPU: CUDA graphs "
                                            "of the eager kernels, traced in about 10 s; with bf16 autocast 0.317 s "
                                            "per update against reduce-overhead's 0.230); none: eager, the "
                                            "default without a GPU")
    compile_scope: str = arg("whole", "with --compile_ppo_epochs: 'whole' compiles the policy and value passes as "
                             "one graph; 'blocks' compiles one transformer block, which serves all of both models "
                             "(H200, GPT-2: first update 21 s against 54 s cold, 0.276 s per update against 0.236: "
                             "sooner for runs under about 4-6 IMDB passes, e.g. one pass 74 s against 100 s)")
    logprob_chunk_mib: int = arg(32, "log-probabilities over the vocabulary computed this many MiB of logits at a "
                                 "time (TRL: one prompt at a time, several GPU kernels each); 0: TRL's own. Same "
                                 "values; on an H200 (eager fp32, one call) TRL's ran faster, 0.48 against 0.53 s "
                                 "per update: to be repeated (README: Speed on a GPU)")
    tiny_assets_dir: Optional[str] = arg(None, "with --preset tiny: where the tiny models and data are built")


# A preset changes only defaults (explicit flags and YAML win) and prints what it changed. "{tiny}" stands for the
# directory the tiny assets are built in. The tiny run is too short to earn back the GPU layout's compilation.
PRESETS = {
    "tiny": dict(model_name_or_path="{tiny}/gpt2", reward_model_name_or_path="{tiny}/distilbert",
                 dataset_name="{tiny}/reviews", num_eval_prompts=64, learning_rate=5e-4, total_episodes=3072,
                 batch_size=32, num_mini_batches=2, kl_coef=0.1, reward_batch_size=64, logging_steps=10,
                 sample_every=0, static_cache_generation=False, compile_ppo_epochs=None),
}
# A run without a GPU changes these settings as a preset does (explicit flags win), where they hold the GPU
# layout's value (first) and not one edited in: to the second. A CPU cannot record CUDA graphs, and gains nothing
# from the static cache.
WITHOUT_A_GPU = dict(static_cache_generation=(True, False), compile_ppo_epochs=("reduce-overhead", None))


# %% 1. Data: IMDB reviews -> prompts of 2-8 policy tokens. Held-out prompts come from the eval split.
def load_reviews(args: Args, split: str, setting: str):
    """One split with its text column renamed `review`, keeping reviews longer than `min_review_chars`."""
    dataset = load_or_explain(lambda name: load_dataset(name, split=split), args.dataset_name, "dataset_name",
                              related=setting)
    if args.text_column not in dataset.column_names:
        fail(f"The '{split}' split of '{args.dataset_name}' has no '{args.text_column}' column (it has: "
             f"{', '.join(dataset.column_names)}). Set --text_column to the column holding the review text.")
    read = len(dataset)
    dataset = dataset.rename_column(args.text_column, "review")
    dataset = dataset.filter(lambda review: isinstance(review, str) and review.strip() != "", input_columns="review")
    no_text = read - len(dataset)
    dataset = dataset.filter(lambda review: len(review) > args.min_review_chars, input_columns="review")
    PartialState().print(f"{split}: kept {len(dataset)} of {read} reviews; dropped {no_text} with no text and "
                         f"{read - no_text - len(dataset)} of --min_review_chars {args.min_review_chars} or fewer")
    if no_text == read:
        fail(f"No row of the '{split}' split of '{args.dataset_name}' has text in its '{args.text_column}' column "
             f"(--text_column). Set --text_column to the column holding the review text (the split has: "
             f"{', '.join(name if name != 'review' else args.text_column for name in dataset.column_names)}).")
    if len(dataset) == 0:
        fail(f"No review in the '{split}' split of '{args.dataset_name}' is longer than --min_review_chars "
             f"({args.min_review_chars}). Lower --min_review_chars or use another dataset.")
    return dataset


def make_prompts(dataset, tokenizer, args: Args, seed: int):
    """Cut each review to its first k tokens, k drawn uniformly from [prompt_min_tokens, prompt_max_tokens]."""
    lengths = np.random.default_rng(seed).integers(args.prompt_min_tokens, args.prompt_max_tokens + 1, len(dataset))

    def cut(batch, indices):
        ids = tokenizer(batch["review"], add_special_tokens=False)["input_ids"]
        ids = [row[: lengths[i]] for row, i in zip(ids, indices)]
        return {"input_ids": ids, "query": tokenizer.batch_decode(ids)}

    prompts = dataset.map(cut, batched=True, with_indices=True, num_proc=args.dataset_num_proc)
    return prompts.filter(lambda ids: len(ids) >= args.prompt_min_tokens, input_columns="input_ids")


def load_prompts(args: Args, tokenizer):
    """Training prompts from the train split; a fixed held-out set from the eval split, minus any review in train."""
    train_reviews = load_reviews(args, args.dataset_train_split, "dataset_train_split")
    eval_reviews = load_reviews(args, args.dataset_eval_split, "dataset_eval_split")
    seen = set(train_reviews["review"])
    eval_reviews = eval_reviews.filter(lambda review: review not in seen, input_columns="review")
    if len(eval_reviews) == 0:
        fail(f"No held-out review is left: every review of the '{args.dataset_eval_split}' split "
             f"(--dataset_eval_split) is also in the '{args.dataset_train_split}' split the policy trains on. Set "
             f"--dataset_eval_split to a split of other reviews (IMDB: test).")
    eval_reviews = eval_reviews.shuffle(seed=args.seed).select(range(min(args.num_eval_prompts, len(eval_reviews))))
    train_prompts = make_prompts(train_reviews, tokenizer, args, seed=args.seed)
    eval_prompts = make_prompts(eval_reviews, tokenizer, args, seed=args.seed + 1)
    processes = PartialState().num_processes
    if len(train_prompts) < args.batch_size * processes:
        fail(f"Only {len(train_prompts)} training prompts remain after filtering, fewer than one --batch_size "
             f"({args.batch_size}) for each of {processes} process(es). Lower --batch_size or --min_review_chars.")
    return train_prompts, eval_prompts


# %% 2. Models and reward: policy, frozen reference copy, GPT-2 value model, and the classifier's POSITIVE logit.
def load_policy_tokenizer(args: Args):
    # Left padding: generation continues from the right edge of each prompt. Given at load time, it is saved too.
    tokenizer = load_checked_tokenizer(args.model_name_or_path, "model_name_or_path", padding_side="left")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # With pad = eos the trainer treats a generated EOS as padding: it is masked out and never learned.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def load_policy_models(args: Args, tokenizer):
    """Policy, a frozen reference copy of it, and a GPT-2 value model (same backbone + scalar head)."""
    policy = load_or_explain(AutoModelForCausalLM.from_pretrained, args.model_name_or_path, "model_name_or_path")
    value_name = args.value_model_name_or_path or args.model_name_or_path
    # The value model reads the policy's token ids: its vocabulary must be the tokenizer's (with or without [PAD]).
    value_vocab = getattr(load_or_explain(AutoConfig.from_pretrained, value_name, "value_model_name_or_path")
                          .get_text_config(), "vocab_size", None)
    if value_vocab is None or not tokenizer.vocab_size <= value_vocab <= len(tokenizer):
        fail(f"The value model '{value_name}' (--value_model_name_or_path) has a vocabulary of {value_vocab} tokens, "
             f"the policy's tokenizer {tokenizer.vocab_size} (+{len(tokenizer) - tokenizer.vocab_size} added): it "
             f"reads the policy's token ids, so it must share the policy's tokenizer. Leave "
             f"--value_model_name_or_path unset (the policy's own backbone) or give a model of the policy's family.")
    # The scalar value head is new either way: a checkpoint's own classifier head (other labels) is not loaded.
    value_model = load_or_explain(lambda name: AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=1, ignore_mismatched_sizes=True), value_name, "value_model_name_or_path")
    for model in (policy, value_model):
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))  # room for the added [PAD]
        model.config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    context = getattr(policy.config, "n_positions", None) or getattr(policy.config, "max_position_embeddings", None)
    if context and args.prompt_max_tokens + args.response_length > context:
        fail(f"--prompt_max_tokens + --response_length ({args.prompt_max_tokens} + {args.response_length}) exceeds "
             f"the policy's context of {context} tokens. Lower one of them.")
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy, ref_policy, value_model


def load_reward_model(args: Args, policy_tokenizer) -> "SentimentReward":
    """The classifier's logit for `positive_label` on prompt + response, behind TRL's reward-model interface."""
    name = args.reward_model_name_or_path
    config = load_or_explain(AutoConfig.from_pretrained, name, "reward_model_name_or_path")
    kinds = config.architectures or []
    if not any(kind.endswith("ForSequenceClassification") for kind in kinds):
        fail(f"The reward model '{name}' (--reward_model_name_or_path) is a {', '.join(kinds) or config.model_type}, "
             f"not a sequence classifier: the reward is a sentiment classifier's logit. Set "
             f"--reward_model_name_or_path to a classifier such as lvwerra/distilbert-imdb.")
    classifier = load_or_explain(AutoModelForSequenceClassification.from_pretrained, name, "reward_model_name_or_path")
    label2id = classifier.config.label2id or {}
    # By name, never by position: sorted pipeline outputs once made the anchor notebook read the wrong class.
    if args.positive_label not in label2id:
        fail(f"The classifier '{name}' has no label '{args.positive_label}' (its labels: {sorted(label2id)}). "
             f"Set --positive_label to the label whose logit should be the reward.")
    classifier_tokenizer = load_checked_tokenizer(name, "reward_model_name_or_path")
    return SentimentReward(DecodeAndClassify(
        classifier, classifier_tokenizer, policy_tokenizer, label2id[args.positive_label], args.reward_batch_size))


# %% 3. Trainer: TRL's PPO configuration from the constants above.
def build_ppo_config(args: Args, eval_size: int) -> PPOConfig:
    gpu = on_gpu(args)
    return PPOConfig(
        output_dir=args.output_dir, seed=args.seed, learning_rate=args.learning_rate,
        total_episodes=args.total_episodes,
        num_train_epochs=1,  # used only when total_episodes is None: one pass over the prompts
        per_device_train_batch_size=args.batch_size // args.gradient_accumulation_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_mini_batches=args.num_mini_batches,
        num_ppo_epochs=args.num_ppo_epochs, kl_coef=args.kl_coef, cliprange=args.cliprange,
        cliprange_value=args.cliprange_value, vf_coef=args.vf_coef, gamma=args.gamma, lam=args.lam,
        response_length=args.response_length, temperature=args.temperature, stop_token="eos",
        local_rollout_forward_batch_size=args.batch_size,  # the whole rollout batch in one generation batch
        per_device_eval_batch_size=min(16, eval_size),
        num_sample_generations=1 if args.sample_every > 0 else 0,  # > 0 turns the sample tables on
        report_to=args.report_to, run_name=args.run_name, logging_steps=args.logging_steps, save_strategy="no",
        disable_tqdm=False,  # a progress bar with the step count and time left (quiet library logs would hide it)
        dataset_num_proc=args.dataset_num_proc, use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),  # TrainingArguments refuses bf16 on CPU; TRL's PPO ignores it
        tf32=tf32_setting(args),
    )


# %% 4. Train: the recipe in order. main() runs every stage; 5 and 6 are the functions below it.
def main(args: Args) -> dict:
    """Train and evaluate as `args` says; returns what eval.json holds."""
    started = time.time()
    # 0. Before anything is loaded: refuse settings that cannot work, protect finished runs, seed, pick the tracker.
    validate(args)
    skips_before = cuda_graph_skips()  # the count is the process's: earlier runs in a notebook counted too
    with StopRequest() as stop:  # Ctrl-C or SIGTERM, from here to the end: see Appendix C
        PartialState(cpu=not on_gpu(args))  # the first PartialState fixes the process group: CPU without a GPU
        check_hub_reachable(args, ["model_name_or_path", "value_model_name_or_path", "reward_model_name_or_path",
                                   "dataset_name"])
        checkpoint = prepare_output_dir(args, checkpoint_marker="counters.json")
        if args.preset == "tiny":
            with PartialState().main_process_first():  # after the refusals; one process builds, others reuse
                build_tiny_assets(args.tiny_assets_dir, seed=0)
        set_seed(args.seed)
        prepare_tracking(args)
        say = PartialState().print  # progress lines from the main process only

        # 1. Data
        tokenizer = load_policy_tokenizer(args)
        with PartialState().main_process_first():  # one process fills the datasets cache, the others read it
            train_prompts, eval_prompts = load_prompts(args, tokenizer)
        say(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out prompts")

        # 2. Models and reward
        policy, ref_policy, value_model = load_policy_models(args, tokenizer)
        reward = load_reward_model(args, tokenizer)

        # 3. Trainer, set up for resume, interrupts, sample tables and precision in its constructor (Appendix A)
        trainer = SentimentPPOTrainer(
            args=build_ppo_config(args, eval_size=len(eval_prompts)), processing_class=tokenizer, model=policy,
            ref_model=ref_policy, reward_model=reward, value_model=value_model,
            train_dataset=train_prompts.select_columns(["input_ids"]),
            eval_dataset=eval_prompts.select_columns(["input_ids"]), settings=args, checkpoint=checkpoint, stop=stop)

        # 4. Train, then save the trained policy at once: nothing trained is lost if anything later fails
        say(f"Training: {trainer.total_updates} PPO updates of {args.batch_size} prompts per process on "
            f"{trainer.accelerator.num_processes} x {trainer.accelerator.device}"
            + (f", resuming after update {trainer.updates_done} from {checkpoint}" if checkpoint else "")
            + first_update_compiles(args))
        stop.enter("training")
        train_started = time.time()
        try:
            trainer.train()
        except Stopped as stopped:
            stop.exit_after_checkpoint(f"after update {trainer.state.global_step} of {trainer.total_updates}",
                                       str(stopped))
        train_seconds = time.time() - train_started
        stop.enter("saving")
        save_outputs(trainer, tokenizer, args)
        stop.enter("evaluation")

        # 5. Evaluate the reference and the trained policy on the same held-out prompts, with the same seed
        say(f"Evaluating the reference and the trained policy on {len(eval_prompts)} held-out prompts ...")
        trained_policy = trainer.accelerator.unwrap_model(trainer.model).policy
        reference_result = evaluate(ref_policy, ref_policy, reward, tokenizer, eval_prompts, args)
        trained_result = evaluate(trained_policy, ref_policy, reward, tokenizer, eval_prompts, args)

        # 6. Report: eval.json, the table, the tracker's summary; then the upload to the hub if asked for
        updates_run = trainer.total_updates - trainer.updates_done
        result = {"reference": reference_result, "trained": trained_result, "args": asdict(args),
                  "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 2),
                  "updates": trainer.total_updates, "updates_this_run": updates_run,
                  "seconds_per_update": round(train_seconds / max(updates_run, 1), 4),
                  "samples_per_second": round(updates_run * trainer.args.batch_size / train_seconds, 2),
                  **trainer.phase_timings(),
                  "policy_ratio_error": round(trainer.policy_ratio_error(eval_prompts["input_ids"]), 6),
                  "cuda_graph_skips": cuda_graph_skips() - skips_before,
                  "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
                  if torch.cuda.is_available() else None, "written_by_process": PartialState().process_index}
        if PartialState().is_main_process:
            write_json(os.path.join(args.output_dir, "eval.json"), result)
            stop.enter("reporting")
            report(reference_result, trained_result, wandb_run_if_open(args))
            print(f"Saved the policy, tokenizer and eval.json to {args.output_dir} ({result['seconds']}s)")
            upload_failed = push_to_hub(trained_policy, tokenizer, args) if args.push_to_hub else None
            if upload_failed:
                fail(upload_failed)
    return result


# %% 5. Evaluate: sample responses to the held-out prompts, score them with the classifier, estimate the KL.
@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[list[int]], args: Args, seed: int) -> list[list[int]]:
    """One sampled response per prompt (the rollouts' sampling: top_k=0, top_p=1), cut after the first EOS."""
    device = next(model.parameters()).device
    responses = []
    # Same seed for reference and trained policy (a paired comparison), without disturbing training's RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), args.eval_batch_size):
            batch = tokenizer.pad({"input_ids": prompts[start : start + args.eval_batch_size]},
                                  return_tensors="pt").to(device)
            output = model.generate(**batch, max_new_tokens=args.response_length, do_sample=True, top_k=0, top_p=1.0,
                                    temperature=args.temperature, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                responses.append([token for token in row[:end] if token != tokenizer.pad_token_id])
    return responses


@torch.no_grad()
def response_logprobs(model, prompts, responses, temperature: float) -> torch.Tensor:
    """Sum over each response of log p(token | prompt, earlier tokens), at the sampling temperature."""
    device = next(model.parameters()).device
    totals = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
        totals.append(torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None]).sum())
    return torch.stack(totals).cpu() if totals else torch.zeros(0)


def evaluate(model, ref_policy, reward: "SentimentReward", tokenizer, eval_prompts, args: Args) -> dict:
    """Reward statistics of `model` on the held-out prompts, with its KL to the reference on its own samples."""
    was_training = model.training
    model.eval()
    prompts = list(eval_prompts["input_ids"])  # datasets 5 returns a lazy Column
    responses = generate_responses(model, tokenizer, prompts, args, seed=args.seed + 2)
    rewards = reward.backbone.score_token_rows([p + r for p, r in zip(prompts, responses)]).cpu().tolist()
    kl = torch.zeros(len(prompts)) if model is ref_policy else (
        response_logprobs(model, prompts, responses, args.temperature)
        - response_logprobs(ref_policy, prompts, responses, args.temperature))
    model.train(was_training)
    return {
        "reward_mean": statistics.fmean(rewards), "reward_median": statistics.median(rewards),
        "reward_std": statistics.pstdev(rewards), "kl_to_reference": kl.mean().item(), "num_prompts": len(rewards),
        "samples": [{"prompt": q, "response": tokenizer.decode(r, skip_special_tokens=True), "reward": v}
                    for q, r, v in zip(list(eval_prompts["query"]), responses, rewards)],
    }


# %% 6. Report: the before/after table, eval.json and the tracker's summary.
def report(reference: dict, trained: dict, wandb_run=None):
    """Print the before/after comparison, and log it to wandb when a run is open."""
    print("\n=== Held-out evaluation ===============================================")
    print(f"{'':10} {'reward mean':>12} {'reward median':>14} {'KL to ref':>10}")
    for name, result in (("reference", reference), ("trained", trained)):
        print(f"{name:10} {result['reward_mean']:12.3f} {result['reward_median']:14.3f} "
              f"{result['kl_to_reference']:10.3f}")
    for ref_sample, new_sample in list(zip(reference["samples"], trained["samples"]))[:5]:
        print(f"\nprompt:    {ref_sample['prompt']!r}")
        print(f"reference: {ref_sample['response']!r}  [{ref_sample['reward']:+.2f}]")
        print(f"trained:   {new_sample['response']!r}  [{new_sample['reward']:+.2f}]")
    print("=======================================================================\n")
    summary = {f"eval/{name}/{key}": result[key] for name, result in (("reference", reference), ("trained", trained))
               for key in ("reward_mean", "reward_median", "reward_std", "kl_to_reference")}
    rows = [[r["prompt"], r["response"], r["reward"], t["response"], t["reward"]]
            for r, t in zip(reference["samples"], trained["samples"])]
    log_evaluation(wandb_run, summary, "eval/samples", rows,
                   ["prompt", "reference response", "reference reward", "trained response", "trained reward"])


# %% Appendix A: TRL 1.12 workarounds. Where this script touches TRL's PPO trainer, and why:
# - the reward model interface: TRL calls `score(backbone(policy ids))`; DistilBERT has its own tokenizer
#   (SentimentReward, DecodeAndClassify)
# - PPOTrainer.train: swaps the module globals `forward`, `selective_log_softmax`, `gc` and `empty_cache` of
#   trl.experimental.ppo.ppo_trainer while it runs (a KV cache nobody reads, a per-row loop, TRL's per-update memory
#   freeing), and the policy's `generate` (rollouts into one static cache)
# - PPOTrainer.dataloader: replaced by a resumable batch order (TRL reshuffles from the global RNG, cannot resume)
# - PPOTrainer.log / generate_completions / sample_generations_freq: the reward's spread, phase timings, episodes
#   per second of this run after a resume, logging every logging_steps, sample tables every N updates without
#   shifting training's RNG
# - callbacks and accelerate's save_state/load_state: checkpoints and resume (TRL 1.12's PPO has none), restored
#   before the progress bar starts
# - save_outputs: not TRL's save_model, which fails with several processes
import itertools
from contextlib import contextmanager, nullcontext
from functools import partial
from types import SimpleNamespace

from transformers import CompileConfig, DataCollatorWithPadding, GenerationConfig, StaticCache, TrainerCallback
from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo_module
from trl.trainer.utils import selective_log_softmax


class DecodeAndClassify(torch.nn.Module):
    """Backbone of `SentimentReward`: policy token ids -> text -> classifier tokens -> one logit per sequence."""

    def __init__(self, classifier, classifier_tokenizer, policy_tokenizer, label_index: int, batch_size: int):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.classifier_tokenizer, self.policy_tokenizer = classifier_tokenizer, policy_tokenizer
        self.label_index, self.batch_size = label_index, batch_size
        self.recent_rewards: list[torch.Tensor] = []  # rewards since the last `pop_recent_rewards`, for logging

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> torch.Tensor:
        """The chosen label's logit for each text, in batches, with the classifier's own tokenizer."""
        device = next(self.classifier.parameters()).device
        logits = [torch.zeros(0, device=device)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.classifier_tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt",
                return_token_type_ids=False,  # DistilBERT takes none
            ).to(device)
            logits.append(self.classifier(**batch).logits[:, self.label_index].float())
        return torch.cat(logits)

    def score_token_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """Reward of each sequence of policy tokens (special tokens such as EOS and PAD are dropped)."""
        return self.score_texts(self.policy_tokenizer.batch_decode(rows, skip_special_tokens=True))

    def forward(self, input_ids, attention_mask, **unused):
        # The trainer writes 0 over pad positions, and 0 is a real GPT-2 token ("!"): keep only attended positions.
        # One copy to the host for the whole batch (a copy per row would wait on the GPU once per row).
        rows = [[token for token, keep in zip(ids, mask) if keep]
                for ids, mask in zip(input_ids.tolist(), attention_mask.bool().tolist())]
        scores = self.score_token_rows(rows)
        self.recent_rewards.append(scores.detach().cpu())
        # TRL reads `score(hidden_states[-1])` at each sequence's last token: broadcast the score over positions.
        hidden = scores.view(-1, 1, 1).expand(-1, input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(hidden,))


class SentimentReward(torch.nn.Module):
    """Lets TRL's PPO trainer use a classifier that has its own tokenizer: the trainer calls
    `score(getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., ...).hidden_states[-1])`."""

    base_model_prefix = "backbone"

    def __init__(self, backbone: DecodeAndClassify):
        super().__init__()
        self.backbone = backbone
        self.score = torch.nn.Identity()

    def pop_recent_rewards(self) -> torch.Tensor:
        rewards, self.backbone.recent_rewards = self.backbone.recent_rewards, []
        return torch.cat(rewards) if rewards else torch.zeros(0)


class SentimentPPOTrainer(PPOTrainer):
    """TRL's PPO trainer, set up in its constructor for this recipe: sample tables every `sample_every` updates,
    checkpoints and faithful resume (weights, optimizer, schedule, RNG, counters, data position), a stop on Ctrl-C
    or SIGTERM after the current update, the reward's spread in the logs (TRL logs only its mean), the wall time of
    each update's rollout and optimisation phases, and no per-update memory freeing unless asked for."""

    def __init__(self, *args, settings: Args, checkpoint: Optional[str], stop: "StopRequest", **kwargs):
        # TRL builds its own Accelerator without a mixed precision; accelerate reads it from the environment then.
        previous = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if bf16_autocast(settings):
            os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
        try:
            super().__init__(*args, **kwargs)
        finally:  # for this trainer only: a later run in the same process (a notebook) starts from the user's setting
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
            os.environ.update({"ACCELERATE_MIXED_PRECISION": previous} if previous is not None else {})
        self.settings = settings
        if settings.sample_every > 0:
            self.sample_generations_freq = settings.sample_every  # TRL spreads a fixed count; we want every N
        self.total_updates = self.args.num_total_batches
        self.checkpoints = Checkpoints(self, settings, stop)  # registers the schedule with accelerate's save_state
        self.updates_done = 0  # by the run this one resumes
        if checkpoint:
            self.accelerator.load_state(checkpoint)  # weights, optimizer, schedule and every RNG
            self.checkpoints.resumed = read_json(os.path.join(checkpoint, "counters.json"))
            self.updates_done = self.checkpoints.resumed["global_step"]
            self.args.num_total_batches = self.total_updates - self.updates_done  # TRL's loop runs this many
        self.callback_handler.callbacks.insert(0, self.checkpoints)  # first: the progress bar sees restored counters
        show_progress_from_the_resumed_step(self)
        self.dataloader = self.timed(ResumableBatches(
            self.train_dataset, self.args.local_batch_size, prompt_collator(self.processing_class, settings),
            settings.seed, self.accelerator.process_index, self.accelerator.num_processes, self.updates_done))
        self.rollout_cache: Optional[StaticCache] = None  # with --static_cache_generation: see rollout_generation
        self.phase_seconds = {"rollout": [], "optimisation": []}  # one entry per update, in order
        self.phase_started = {}
        # The policy-and-value wrapper runs only in the PPO epochs: rollouts call the policy and value model apart.
        wrapper = self.accelerator.unwrap_model(self.model)
        wrapper.register_forward_pre_hook(self.optimisation_begins)
        if settings.compile_ppo_epochs:
            compile_ppo_epochs(wrapper, settings.compile_ppo_epochs, settings.compile_scope)

    def train(self):
        with self.trl_functions_swapped(), self.rollout_generation():
            return super().train()

    @contextmanager
    def trl_functions_swapped(self):
        """While open, TRL's PPO loop calls these in place of its module's own (trl.experimental.ppo.ppo_trainer):
        - `forward` (the PPO epochs' policy-and-value pass, the rollout's reference pass): the same pass without a
          KV cache. GPT-2's config turns the cache on, so TRL's copied every layer's keys and values into one
          (two more kernels per layer) and kept them alive through the loss and backward, for nothing.
        - `selective_log_softmax`: the same values a chunk of rows at a time (log_softmax_in_chunks), unless
          --logprob_chunk_mib 0.
        - `gc` and `empty_cache`, unless --free_memory_each_update: TRL runs gc.collect() twice and empties the CUDA
          cache about ten times per update, to keep big models' peak memory down. For GPT-2 that costs more than it
          saves: one collect took 0.22 s on 2 CPU cores (a tiny update went from 0.68 s to 0.22 s without them), and
          an emptied cache makes every update ask the GPU driver for its memory again. Python's own collector still
          runs as usual."""
        swapped = {"forward": forward_without_kv_cache}
        if self.settings.logprob_chunk_mib:
            swapped["selective_log_softmax"] = partial(log_softmax_in_chunks,
                                                       chunk_bytes=self.settings.logprob_chunk_mib * 2**20)
        if not self.settings.free_memory_each_update:
            swapped.update(gc=SimpleNamespace(collect=lambda *args: 0), empty_cache=lambda: None)
        saved = {name: getattr(trl_ppo_module, name) for name in swapped}
        vars(trl_ppo_module).update(swapped)
        try:
            yield
        finally:
            vars(trl_ppo_module).update(saved)

    def rollout_generation(self):
        """Where rollouts are generated: with --static_cache_generation, the policy decodes rollout-shaped batches
        into one static cache for the whole run (compiled on a GPU)."""
        if not self.settings.static_cache_generation:
            return nullcontext()
        policy = self.accelerator.unwrap_model(self.model).policy
        if self.rollout_cache is None:  # allocated on its first use, once for the run
            self.rollout_cache = StaticCache(config=policy.config,
                                             max_cache_len=self.settings.prompt_max_tokens + self.args.response_length)
        return rollouts_decode_into(self.rollout_cache, policy, batch_size=self.args.local_rollout_forward_batch_size,
                                    prompt_width=self.settings.prompt_max_tokens,
                                    response_length=self.args.response_length,
                                    compile_config=decode_compile_config(self.settings.compile_decode))

    def clock(self) -> float:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is queued: without waiting, time would land in the wrong phase
        return time.perf_counter()

    def timed(self, batches):
        """The prompt batches TRL's loop draws, one per update; drawing one starts that update's rollout."""
        for batch in batches:
            self.phase_started = {"rollout": self.clock()}
            yield batch

    def optimisation_begins(self, module, inputs):
        if "rollout" in self.phase_started and "optimisation" not in self.phase_started:
            self.phase_started["optimisation"] = self.clock()

    def log(self, logs: dict, *args, **kwargs):
        if "objective/scores" in logs:  # TRL logs once per update, right after the PPO epochs
            rewards = self.reward_model.pop_recent_rewards()
            if len(rewards):
                rewards = self.accelerator.gather_for_metrics(rewards.to(self.accelerator.device))
                logs["objective/scores_std"] = rewards.float().std().item() if len(rewards) > 1 else 0.0
            if "optimisation" in self.phase_started:
                ended, started = self.clock(), self.phase_started
                self.phase_seconds["rollout"].append(started["optimisation"] - started["rollout"])
                self.phase_seconds["optimisation"].append(ended - started["optimisation"])
                logs["time/rollout_seconds"] = round(self.phase_seconds["rollout"][-1], 4)
                logs["time/optimisation_seconds"] = round(self.phase_seconds["optimisation"][-1], 4)
            self.phase_started = {}
            if self.checkpoints.resumed and self.state.episode:  # TRL divides every episode, those of the run
                done = self.checkpoints.resumed["episode"]  # resumed too, by this run's time: 5x too high at first
                logs["eps"] = int(logs.get("eps", 0) * (self.state.episode - done) / self.state.episode)
            update = self.state.global_step
            if update % self.args.logging_steps and update != self.total_updates:
                return  # TRL logs every update, whatever logging_steps says; the last update is always logged
        super().log(logs, *args, **kwargs)

    def phase_timings(self) -> dict:
        """Mean seconds per update of each phase, leaving out the first update (warm-up) when there are others, and
        the first update's own: a compiled decode compiles in the first rollout, compiled PPO epochs in the first
        optimisation."""
        timings = {}
        for phase, seconds in self.phase_seconds.items():
            steady = seconds[1:] or seconds
            timings[f"{phase}_seconds_per_update"] = round(sum(steady) / len(steady), 4) if steady else None
            timings[f"first_{phase}_seconds"] = round(seconds[0], 4) if seconds else None
        return timings

    def generate_completions(self, sampling: bool = False):
        # Sample tables must not shift training's random numbers (a resumed run would diverge from the original).
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
            super().generate_completions(sampling)
        self.reward_model.pop_recent_rewards()  # sample-table rewards are not rollout rewards

    @torch.no_grad()
    def policy_ratio_error(self, prompts) -> float:
        """Mean |ratio - 1| over response tokens at a first PPO epoch, before any optimizer step: the rollout's
        log-probabilities (generated as rollouts are: in the load precision, with the rollouts' padding, and with
        their static cache given a full batch of prompts) against those of the PPO epochs' forward pass (the
        prepared model as the epochs run it, under autocast where it is on), both through the functions TRL's loop
        ran with (trl_functions_swapped), on one batch of `prompts`. Ideally 0; PPO's clipping sees any
        difference as policy change."""
        pad_token_id, temperature = self.processing_class.pad_token_id, self.args.temperature + 1e-7
        collate = prompt_collator(self.processing_class, self.settings)
        # Exactly one rollout batch, the held-out prompts repeated if there are fewer: a smaller batch would miss
        # the static cache and, compiled, run a micro-batch of a new size, which compiles the epochs' graph again.
        one_batch = itertools.islice(itertools.cycle(list(prompts)), self.args.local_batch_size)
        queries = collate([{"input_ids": ids} for ids in one_batch])
        queries = queries["input_ids"].to(self.accelerator.device)
        config = GenerationConfig(max_new_tokens=self.args.response_length, temperature=temperature, top_k=0.0,
                                  top_p=1.0, do_sample=True)
        policy, context = self.accelerator.unwrap_model(self.model).policy, queries.shape[1]
        cuda = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with self.trl_functions_swapped():  # the functions training ran with
            with torch.random.fork_rng(devices=cuda), self.rollout_generation():
                query_responses, logits = trl_ppo_module.batch_generation(policy, queries, len(queries),
                                                                          pad_token_id, config)
            responses = query_responses[:, context:]
            rollout = trl_ppo_module.selective_log_softmax(logits, responses)
            # The PPO epochs' pass as they run it: training mode, gradients on, their micro-batch size. A compiled
            # run then reuses its training graph instead of compiling another for this check.
            micro = min(self.args.per_device_train_batch_size, self.args.local_mini_batch_size)
            training = self.model.training
            self.model.train()
            epoch = []
            with torch.enable_grad():
                for start in range(0, len(query_responses), micro):
                    output, _ = trl_ppo_module.forward(self.model, query_responses[start : start + micro],
                                                       pad_token_id)
                    logits = output.logits[:, context - 1 : -1].detach().float() / temperature
                    epoch.append(trl_ppo_module.selective_log_softmax(logits, responses[start : start + micro]))
            self.model.train(training)
        epoch = torch.cat(epoch)
        eos = (responses == self.processing_class.eos_token_id).long()
        valid = torch.cumsum(eos, 1) - eos == 0  # tokens up to and including the first EOS; TRL masks the rest
        return ((epoch - rollout).exp() - 1).abs()[valid].mean().item()


class ResumableBatches:
    """Prompt batches in a fixed order per (seed, epoch), each process taking its own slice, starting at any update.
    TRL's loader reshuffles from the global RNG and always starts at the first batch, so it cannot be resumed."""

    def __init__(self, dataset, batch_size: int, collator, seed: int, rank: int, world_size: int, first_update: int):
        self.dataset, self.batch_size, self.collator = dataset, batch_size, collator
        self.seed, self.rank, self.world_size, self.first_update = seed, rank, world_size, first_update
        self.updates_per_epoch = len(dataset) // (batch_size * world_size)

    def __iter__(self):
        update = self.first_update
        while True:
            epoch, index = divmod(update, self.updates_per_epoch)
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
            start = (index * self.world_size + self.rank) * self.batch_size
            yield self.collator([self.dataset[i] for i in order[start : start + self.batch_size].tolist()])
            update += 1


class Stopped(Exception):
    """Raised after the checkpoint of an interrupted run is saved (TRL's PPO loop has no stop flag of its own)."""


class Checkpoints(TrainerCallback):
    """Saves what a faithful continuation needs, every `save_steps` updates and when a stop is requested: policy and
    value model, optimizer, learning-rate schedule, every RNG (accelerate's save_state), and the update and episode
    counters. Written under a temporary name and renamed when complete, so a crash while saving never leaves a
    checkpoint that looks complete. On resume, restores the counters that TRL's loop resets when it starts."""

    def __init__(self, trainer, args: Args, stop: "StopRequest"):
        self.trainer, self.args, self.stop = trainer, args, stop
        self.resumed: Optional[dict] = None  # the counters of the checkpoint this run continues from
        trainer.accelerator.register_for_checkpointing(trainer.lr_scheduler)

    def save(self, state) -> str:
        accelerator = self.trainer.accelerator
        directory = os.path.join(self.args.output_dir, f"checkpoint-{state.global_step}")
        staging = os.path.join(self.args.output_dir, f".saving-checkpoint-{state.global_step}")

        def save():
            accelerator.save_state(staging, safe_serialization=False)  # GPT-2 ties two weights
            if accelerator.is_main_process:
                write_json(os.path.join(staging, "counters.json"),
                           {"global_step": state.global_step, "episode": state.episode})

        save_atomically(accelerator, staging, directory, save)
        return directory

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resumed:
            state.global_step, state.episode = self.resumed["global_step"], self.resumed["episode"]
            state.max_steps = self.resumed["global_step"] + args.num_total_batches

    def on_step_end(self, args, state, control, **kwargs):
        periodic = self.args.save_steps > 0 and state.global_step % self.args.save_steps == 0
        if self.stop.requested() or periodic:
            directory = self.save(state)
            if self.stop.signal_name:
                raise Stopped(directory)


def save_outputs(trainer, tokenizer, args: Args):
    """Policy + tokenizer (loadable with AutoModelForCausalLM.from_pretrained) and the value model, written once.
    Not through TRL 1.12's save_model: with several processes it looks for `.policy` on the DDP wrapper, misses it
    and tries to save the whole wrapper (and its other ranks fail on an attribute TRL never sets)."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.is_main_process:
        unwrapped.policy.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        if args.save_value_model:
            unwrapped.value_model.save_pretrained(os.path.join(args.output_dir, "value_model"))
    trainer.accelerator.wait_for_everyone()


def prompt_collator(tokenizer, args: Args):
    """Pads each batch of prompts to its longest; compiled code (--compile_ppo_epochs, --static_cache_generation)
    gets every batch at --prompt_max_tokens instead, so that its shapes never change: a batch whose prompts all
    come out shorter would otherwise compile once more (with dynamic shapes), mid-run."""
    if args.compile_ppo_epochs or args.static_cache_generation:
        return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.prompt_max_tokens)
    return DataCollatorWithPadding(tokenizer)


@contextmanager
def rollouts_decode_into(cache: StaticCache, policy, batch_size: int, prompt_width: int, response_length: int,
                         compile_config: Optional[CompileConfig] = None):
    """While open, the policy's `generate` decodes every rollout-shaped call (`batch_size` prompts of
    `prompt_width` tokens, `response_length` new tokens) into `cache`, zeroed before each call, compiled (on a GPU)
    as `compile_config` says (None: transformers' default, inductor with CUDA graphs); calls of other
    shapes keep the dynamic cache and stay uncompiled (a sample-table batch that happens to have the rollouts' shape
    uses `cache` too, harmlessly). transformers 5 would allocate a new static cache on every call, and on a GPU its
    compiled decode (CUDA graphs) records its graphs again whenever a cache tensor's address changes (see
    torch._dynamo.mark_static_address), which can happen on every rollout once the PPO epochs' allocations take the
    freed cache's memory. With a new cache per call the H200 rollout gained 0.036 s per update; with this one,
    0.068 s and 0.128 s in two calls (test_rollouts_decode_into_one_static_cache_allocated_once pins the one
    allocation)."""
    generate, defaults = policy.generate, policy.generation_config
    previous = vars(policy).get("generate")  # an instance attribute already there (a wrapper opened around this one)
    # A model's own default cache_implementation would clash with a cache passed in.
    cache_implementation, defaults.cache_implementation = defaults.cache_implementation, None

    def generate_into_one_cache(input_ids=None, generation_config=None, **kwargs):
        rollout_shaped = input_ids is not None and tuple(input_ids.shape) == (batch_size, prompt_width) \
            and getattr(generation_config, "max_new_tokens", None) == response_length
        if rollout_shaped:
            cache.reset()  # zeroes in place: the addresses stay
            kwargs["cache"] = cache
            if compile_config is not None:  # TRL's generation config, reused by every rollout: a copy carries it
                generation_config = copy.copy(generation_config)
                generation_config.compile_config = compile_config
        return generate(input_ids=input_ids, generation_config=generation_config, **kwargs)

    policy.generate = generate_into_one_cache
    try:
        yield cache
    finally:
        if previous is None:
            del policy.generate  # back to the class's method
        else:
            policy.generate = previous
        defaults.cache_implementation = cache_implementation


def forward_without_kv_cache(model, query_responses, pad_token_id: int):
    """TRL's `forward` (trl.experimental.ppo.ppo_trainer.forward), with use_cache=False: the same outputs, without
    the KV cache that the model's config would build and TRL never reads."""
    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True,
                 output_hidden_states=True, use_cache=False)


def log_softmax_in_chunks(logits: torch.Tensor, index: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """TRL's selective_log_softmax (log_softmax(logits) at `index`, one value per position), a chunk of
    `chunk_bytes` of logits at a time. TRL loops over the batch one row at a time to bound memory, so its
    operation count grows with the batch: for 128 x 16 x 50257 logits, forward and backward, 1,170 ATen operations
    against 243 here at 32 MiB (each logsumexp is several GPU kernels). The same arithmetic per row as TRL's:
    logsumexp in fp32 and fp64, log_softmax in lower precisions; tests/test_ppo.py pins the per-row reductions of
    TRL's and the equal values and gradients."""
    if index.ndim != logits.ndim - 1:  # top-K indices: TRL's own
        return selective_log_softmax(logits, index)
    rows = max(1, chunk_bytes // max(1, logits[0].numel() * logits.element_size()))
    chunks = []
    for chunk, chunk_index in zip(logits.split(rows), index.split(rows)):
        if logits.dtype in (torch.float32, torch.float64):
            chunks.append(chunk.gather(-1, chunk_index.unsqueeze(-1)).squeeze(-1) - chunk.logsumexp(-1))
        else:  # TRL: logsumexp is unstable in bf16
            chunks.append(chunk.log_softmax(-1).gather(-1, chunk_index.unsqueeze(-1)).squeeze(-1))
    return torch.cat(chunks)


COMPILE_SCOPES = ("whole", "blocks")  # what --compile_scope may name
EAGER = ("none", "null", "eager")  # what --compile_ppo_epochs may say for None (no compilation)
CUDA_GRAPHS_OF_EAGER_KERNELS = "cudagraphs"  # the compile mode that is torch.compile's cudagraphs backend


def compile_modes() -> list:
    """What --compile_ppo_epochs and --compile_decode may name: torch.compile's modes, each compiled by inductor
    (fused kernels generated and compiled: on an H200 35-55 s for the PPO epochs' pass and 12-15 s for the decode),
    and 'cudagraphs', torch.compile's cudagraphs backend: the traced forward and backward run the eager kernels,
    replayed as CUDA graphs. Nothing is generated, so it costs the tracing only; at GPT-2's size the update is
    launch-bound, and CUDA graphs remove the launches whatever the kernels."""
    from torch._inductor import list_mode_options

    return [*list_mode_options(), CUDA_GRAPHS_OF_EAGER_KERNELS]


def compiled(function, mode: str):
    """torch.compile(function) in one of compile_modes()."""
    if mode == CUDA_GRAPHS_OF_EAGER_KERNELS:
        return torch.compile(function, backend=cudagraphs_backend_holding_parameters_in_place)  # takes no mode
    return torch.compile(function, mode=mode)


def cudagraphs_backend_holding_parameters_in_place(graph_module, example_inputs):
    """torch.compile's cudagraphs backend, with the forward graph's parameters (and a static cache's tensors) held
    where they are, as inductor's reduce-overhead holds them. The stock backend holds in place only the inputs AOT
    autograd lifted, and torch.compile inlines modules now, so it lifts none: every replay copied each parameter of
    the policy and the value model into the graph's own buffers first (H200, 2026-11-27, fp32: peak memory 13.35
    GiB against the eager layout's 12.41 and this backend's 12.58; 0.407 against 0.360 s per update, two calls).
    This hands cudagraph trees the static inputs torch.compile itself marked (what inductor hands it) when the
    forward is recorded; the backward (recorded later, its saved tensors already held in place) is the stock one's."""
    from unittest import mock

    from torch._dynamo.backends.registry import lookup_backend
    from torch._inductor import cudagraph_trees
    from torch._inductor.compile_fx import get_static_input_idxs

    record = cudagraph_trees.cudagraphify_impl

    def record_holding_parameters_in_place(model, inputs, static_input_idxs, *args, is_backward=False, **kwargs):
        if not is_backward:
            static_input_idxs = sorted({*static_input_idxs, *get_static_input_idxs(0)})
        return record(model, inputs, static_input_idxs, *args, is_backward=is_backward, **kwargs)

    with mock.patch.object(cudagraph_trees, "cudagraphify_impl", record_holding_parameters_in_place):
        return lookup_backend("cudagraphs")(graph_module, example_inputs)  # the forward is recorded in here


def first_update_compiles(args: Args) -> str:
    """What the Training line adds when the first update compiles (a long first step is not a hang), or ''. The
    seconds are the H200's, cold (benchmarks/RESULTS.md); max-autotune was never measured."""
    def cold(mode: str, inductor: str, traced: str) -> str:
        return {CUDA_GRAPHS_OF_EAGER_KERNELS: f" ({traced})", "max-autotune": ""}.get(mode, f" ({inductor})")

    decode = args.static_cache_generation and on_gpu(args)
    epochs = "about 6 s, one block" if args.compile_scope == "blocks" else "35-55 s"
    compiling = ([f"the decode{cold(args.compile_decode, '12-15 s', 'about 4 s')}"] if decode else []) + \
        ([f"the PPO epochs' pass{cold(args.compile_ppo_epochs, epochs, 'about 10 s')}"] if args.compile_ppo_epochs
         else [])
    if not compiling:
        return ""
    return f"; the first update also compiles {' and '.join(compiling)}, once per run (seconds on an H200)"


def cuda_graph_skips() -> int:
    """How many compiled graphs this process has run without CUDA graphs (torch.compile's count; the reason is in
    the log): a CPU tensor in the graph, an input it mutates that the backend does not hold at a fixed address.
    Recorded in eval.json, since a skipped graph runs op by op, slower than eager."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def decode_compile_config(mode: str) -> CompileConfig:
    """How transformers compiles a static-cache decode (on a GPU) in one of compile_modes(); reduce-overhead is
    its own default."""
    if mode == CUDA_GRAPHS_OF_EAGER_KERNELS:
        # torch.compile passes on no 'default' mode
        return CompileConfig(backend=cudagraphs_backend_holding_parameters_in_place, mode="default")
    return CompileConfig(mode=mode)


def compile_ppo_epochs(wrapper, mode: str, scope: str = "whole"):
    """Compiles the forward (and so the backward) of TRL's policy-and-value wrapper, which only the PPO epochs call:
    generation and the rollout's reference, value and reward passes stay eager. The compiled function replaces the
    module's `forward`, inside its hooks, so the phase timing hook still runs. transformers 5 installs its
    hidden-state capturing hooks on a model's first call, under a threading lock that torch.compile cannot trace:
    one eager call first, or the graph breaks there
    (test_compiled_ppo_epochs_trace_into_one_graph_after_one_eager_call).

    scope "blocks" (regional compilation) compiles each transformer block's forward instead: one graph serves every
    block of both models, since the blocks share their code and torch.compile treats their parameters as inputs,
    so it compiles one block's forward and backward instead of 24. The compiled blocks are in place only while the
    wrapper's forward runs: the same blocks generate and score rollouts, at other shapes
    (test_compiled_blocks_serve_both_models_in_one_graph_only_inside_the_ppo_pass)."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    device = next(wrapper.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        forward_without_kv_cache(wrapper, torch.zeros((1, 2), dtype=torch.long, device=device), pad_token_id=-1)
    if scope == "whole":
        wrapper.forward = compiled(wrapper.forward, mode)
        return
    from transformers.utils import output_capturing

    blocks = transformer_blocks(wrapper)
    if not blocks:
        fail(f"--compile_scope blocks found no transformer blocks to compile in {type(wrapper.policy).__name__} "
             "(its _no_split_modules names none). Use --compile_scope whole.")
    compiled_blocks = [compiled(block.forward, mode) for block in blocks]
    eager_forward, plain = wrapper.forward, PlainOutputCollector()

    def forward_with_compiled_blocks(*args, **kwargs):
        # What was in place comes back after the pass: an instance's own forward (a hook library may set one), or,
        # for a pass called from inside another, the compiled blocks and the plain collector of the outer one.
        previous = [vars(block).get("forward") for block in blocks]
        collector = output_capturing._active_collector
        try:
            for block, forward in zip(blocks, compiled_blocks):
                block.forward = forward
            output_capturing._active_collector = plain  # process-wide while the pass runs, not per thread
            return eager_forward(*args, **kwargs)
        finally:
            output_capturing._active_collector = collector
            for block, forward in zip(blocks, previous):
                vars(block).pop("forward", None)  # back to the class's method
                if forward is not None:
                    block.forward = forward

    wrapper.forward = forward_with_compiled_blocks


def transformer_blocks(wrapper) -> list:
    """The repeated transformer blocks of the policy and the value model (transformers names their class in
    `_no_split_modules`)."""
    names = {name for model in (wrapper.policy, wrapper.value_model)
             for name in getattr(model, "_no_split_modules", None) or []}
    return [module for module in wrapper.modules() if type(module).__name__ in names]


class PlainOutputCollector:
    """transformers' output collector (which hidden states and attentions a forward pass records) as a plain
    global during the PPO pass, as transformers makes it when a whole model is compiled. Its hooks inside each
    block read it; as the ContextVar it is when the model around the blocks runs eagerly, torch.compile cannot
    trace that read and breaks every block in two (2 CPU cores, tiny preset: 4 breaks, 3 graphs, cold step 7.4 s
    against 4.5 s)."""

    def __init__(self):
        self.value = None

    def get(self):
        return self.value

    def set(self, value):
        token, self.value = self.value, value  # the token is the value before, as a ContextVar's restores it
        return token

    def reset(self, token):
        self.value = token


def bf16_autocast(args: Args) -> bool:
    return args.bf16_autocast and on_gpu(args) and torch.cuda.is_bf16_supported()


# %% Appendix B: this script's settings checks: one paragraph naming the setting, before anything is loaded.
# Settings that shape training's course: a resumed run must use those its checkpoint's run used (settings.json in
# the output dir), or it would end where neither run would. The others (tracking, saving, speed) may change.
RESUME_MUST_MATCH = ("model_name_or_path", "value_model_name_or_path", "reward_model_name_or_path", "positive_label",
                     "dataset_name", "dataset_train_split", "text_column", "seed", "batch_size", "num_mini_batches",
                     "gradient_accumulation_steps", "num_ppo_epochs", "learning_rate", "total_episodes", "kl_coef",
                     "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", "response_length", "temperature",
                     "prompt_min_tokens", "prompt_max_tokens", "min_review_chars")


def validate(args: Args):
    positive = dict(
        response_length=args.response_length, prompt_min_tokens=args.prompt_min_tokens, batch_size=args.batch_size,
        num_ppo_epochs=args.num_ppo_epochs, num_eval_prompts=args.num_eval_prompts, learning_rate=args.learning_rate,
        num_mini_batches=args.num_mini_batches, gradient_accumulation_steps=args.gradient_accumulation_steps,
        reward_batch_size=args.reward_batch_size, temperature=args.temperature, eval_batch_size=args.eval_batch_size,
        total_episodes=1 if args.total_episodes is None else args.total_episodes, logging_steps=args.logging_steps,
        cliprange=args.cliprange, cliprange_value=args.cliprange_value,
    )
    for name, value in positive.items():
        if not value > 0:
            fail(f"--{name} must be positive, got {value}.")
    for name, value in dict(save_steps=args.save_steps, sample_every=args.sample_every, kl_coef=args.kl_coef,
                            vf_coef=args.vf_coef).items():
        if value < 0:
            fail(f"--{name} must be 0 or more, got {value}.")
    for name, value in dict(gamma=args.gamma, lam=args.lam).items():
        if not 0 <= value <= 1:
            fail(f"--{name} must be between 0 and 1, got {value}.")
    if args.prompt_max_tokens < args.prompt_min_tokens:
        fail(f"--prompt_max_tokens ({args.prompt_max_tokens}) is below --prompt_min_tokens ({args.prompt_min_tokens}).")
    if args.batch_size % args.gradient_accumulation_steps:
        fail(f"--batch_size ({args.batch_size}) must be a multiple of --gradient_accumulation_steps "
             f"({args.gradient_accumulation_steps}).")
    if args.batch_size % args.num_mini_batches:
        fail(f"--batch_size ({args.batch_size}) must be a multiple of --num_mini_batches ({args.num_mini_batches}).")
    if args.num_mini_batches > 1 and args.gradient_accumulation_steps > 1:
        # TRL 1.12 steps the optimizer every `gradient_accumulation_steps` micro-batches counted across the whole
        # rollout batch, so with both > 1 it accumulates over several mini-batches: fewer, larger steps than asked.
        fail("--num_mini_batches and --gradient_accumulation_steps cannot both be above 1 with TRL 1.12's PPO "
             "trainer (it would accumulate gradients across mini-batches). Set one of them to 1.")
    if str(args.compile_ppo_epochs).lower() in EAGER:  # how a command line or a YAML file says None
        args.compile_ppo_epochs = None
    modes = compile_modes()
    if args.compile_ppo_epochs is not None and args.compile_ppo_epochs not in modes:
        fail(f"--compile_ppo_epochs must be one of {', '.join(modes)} (torch.compile's modes, and its cudagraphs "
             f"backend), or none for eager; got '{args.compile_ppo_epochs}'.")
    if args.compile_decode not in modes:
        fail(f"--compile_decode must be one of {', '.join(modes)} (torch.compile's modes, and its cudagraphs "
             f"backend); got '{args.compile_decode}'.")
    if args.compile_decode != Args.compile_decode and not args.static_cache_generation:
        fail(f"--compile_decode {args.compile_decode} says how the static-cache decode compiles, and "
             "--static_cache_generation is off (a dynamic cache never compiles). Set --static_cache_generation true "
             "too, or leave --compile_decode out.")
    if args.compile_scope not in COMPILE_SCOPES:
        fail(f"--compile_scope must be {' or '.join(COMPILE_SCOPES)}, got '{args.compile_scope}'.")
    if args.compile_scope == "blocks" and not args.compile_ppo_epochs:
        fail("--compile_scope blocks says what --compile_ppo_epochs compiles, and it is none (eager: the default "
             "without a GPU and in --preset tiny). Set --compile_ppo_epochs too (default on a CPU, reduce-overhead "
             "on a GPU), or leave --compile_scope whole.")
    if args.logprob_chunk_mib < 0:
        fail(f"--logprob_chunk_mib must be 0 (TRL's row-by-row log-probabilities) or more, "
             f"got {args.logprob_chunk_mib}.")
    records_cuda_graphs = ("reduce-overhead", "max-autotune", CUDA_GRAPHS_OF_EAGER_KERNELS)
    if args.compile_ppo_epochs in records_cuda_graphs and not on_gpu(args):
        fail(f"--compile_ppo_epochs {args.compile_ppo_epochs} records CUDA graphs, which need a GPU, and this run "
             "has none. Use --compile_ppo_epochs default (or max-autotune-no-cudagraphs) on a CPU.")
    validate_common(args)


# <shared plumbing>
# %% Appendix C: shared plumbing. Identical in both scripts (a test compares them), inlined so that each script
# runs copied alone: settings parsing and presets, clear errors, output-dir protection, checkpoints, interrupts,
# trackers. Everything here reads the script's own `Args`, `PRESETS`, `WITHOUT_A_GPU`, `RESUME_MUST_MATCH` and
# `SCRIPT`.
import argparse
import json
import random
import shlex
import signal
import sys
import textwrap

import numpy as np
import yaml
from tqdm.auto import tqdm
from transformers import AutoTokenizer, ProgressCallback
from transformers.utils import is_torch_tf32_available
from trl import TrlParser


def parse_args(argv: Optional[list] = None) -> Args:
    """`Args` from the command line and an optional YAML file: flags win over YAML, YAML over the constants in
    `Args`. A preset changes only defaults, and prints one line with each constant it changed; so does a run
    without a GPU, for the GPU-only values in WITHOUT_A_GPU. In a notebook kernel the command line is the kernel's
    own: it is ignored, and the constants as edited in `Args` are used."""
    if argv is None:
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    argv = [part for token in argv for part in (token.split("=", 1) if token.startswith("--config=") else [token])]
    if "--config" in argv[:-1] and yaml_file_is_empty(argv[argv.index("--config") + 1]):
        del argv[argv.index("--config") : argv.index("--config") + 2]  # every line commented out: no settings
    for i, token in enumerate(argv):  # a bare --resume means the latest checkpoint in the output dir
        if token == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "latest")
    written = yaml_as_written(argv)
    base = parse_with_defaults(argv, {}, written)
    if base.preset not in (None, *PRESETS):
        fail(f"--preset must be one of {', '.join(PRESETS)}, got {base.preset!r}.")
    preset = PRESETS[base.preset] if base.preset else {}
    without_a_gpu = {} if on_gpu(base) else {name: instead for name, (gpu_value, instead) in WITHOUT_A_GPU.items()
                                              if name not in preset and getattr(base, name) == gpu_value}
    args = parse_with_defaults(argv, {**preset, **without_a_gpu}, written) if preset or without_a_gpu else base
    if args.preset == "tiny":
        args.tiny_assets_dir = args.tiny_assets_dir or os.path.join(args.output_dir, "tiny_assets")
        for name, value in vars(args).items():
            if isinstance(value, str) and "{tiny}" in value:
                setattr(args, name, value.replace("{tiny}", args.tiny_assets_dir))
    for what, defaults in ((f"preset {args.preset}", preset), ("no GPU", without_a_gpu)):
        changed = [f"{name} {getattr(base, name)} -> {getattr(args, name)}" for name in defaults
                   if getattr(args, name) != getattr(base, name)]
        if changed and os.environ.get("RANK", "0") == "0":  # before any process group exists: the launcher's rank
            print(f"{what} changes: {', '.join(changed)}")
    return args


def build_parser(defaults: dict, written: Optional[dict] = None) -> TrlParser:
    """TRL's parser of `Args`, with `defaults` (a preset's) and the YAML file's values checked as flags are
    (`written`: the file's values as written, see yaml_as_written)."""
    parser = TrlParser(Args, allow_abbrev=False)  # --learning_rat is a typo, not --learning_rate
    parser.error = lambda message: fail(f"{message.rstrip('.')}. `python {SCRIPT} --help` lists every setting.")
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file of settings (name: value); flags given on the command line win over it")
    for action in parser._actions:
        if action.help and "%(" not in action.help:  # argparse %-formats help: "30% slower" would print garbage
            action.help = action.help.replace("%", "%%")
        # transformers gives --no_X the help of --X, which says the opposite
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"turn --{action.option_strings[0][5:]} off"
            action.default = argparse.SUPPRESS  # its "(default: False)" read as the setting's; --X's default rules
        bool_typed = getattr(action.type, "__name__", "") == "string_to_bool"  # TRL's parser's own copy
        if bool_typed and action.nargs is None:  # an Optional[bool] setting: a bare --X means true, as for a bool
            action.nargs, action.const = "?", True
    set_config_defaults = parser.set_defaults_with_config  # what TRL's parser does with the YAML file's values

    def set_defaults_as_text(**config):  # argparse converts (and checks) text defaults only: YAML's 2.5 for an int
        return set_config_defaults(**{name: yaml_value_as_text(name, value, (written or {}).get(name))
                                      for name, value in config.items()})

    parser.set_defaults_with_config = set_defaults_as_text
    parser.set_defaults(**defaults)
    return parser


def yaml_as_written(argv: list) -> dict:
    """The --config file's settings, each value as written (YAML's BaseLoader: text, and lists of text). TRL's
    parser reads the file as YAML 1.1, where `run_name: 0123` is the number 83 and `wandb_entity: no` is false."""
    if "--config" not in argv[:-1]:
        return {}
    try:
        with open(argv[argv.index("--config") + 1]) as handle:
            written = yaml.load(handle, Loader=yaml.BaseLoader)
    except Exception:  # unreadable or not YAML: TRL's parser reads it next and says so, in one paragraph
        return {}
    return written if isinstance(written, dict) else {}


def yaml_value_as_text(name: str, value, written=None):
    """A YAML value as the command line would give it, so that argparse checks its type as it checks a flag's:
    the text as `written` in the file where there is one (`seed: 0123` is 123, as --seed 0123 is)."""
    import typing

    if name == "resume" and isinstance(value, bool):  # resume: true means the latest checkpoint, as a bare --resume
        return "latest" if value else None
    hint = typing.get_type_hints(Args).get(name)
    if value is None and hint is not None and type(None) not in typing.get_args(hint):
        fail(f"--config: {name} is null (or has no value) in the YAML file, and --{name} needs one. Give it a value, "
             f"or delete the line for the default.")
    if value is None:
        return value
    if isinstance(written, str):
        return written
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):  # lora_target_modules: [q_proj, v_proj]
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def yaml_file_is_empty(path: str) -> bool:
    try:
        with open(path) as handle:
            return yaml.safe_load(handle) is None
    except Exception:  # unreadable or not YAML: the parser says so, in one paragraph
        return False


def parse_with_defaults(argv: list, defaults: dict, written: Optional[dict] = None) -> Args:
    try:
        (args,) = build_parser(defaults, written).parse_args_and_config(args=list(argv))
    except ValueError as err:  # TRL's and transformers' parsers report unknown settings as ValueError
        unknown = [token[2:] for token in str(err).split("[", 1)[-1].split("'") if token.startswith("--")]
        if not unknown:
            fail(f"--config: {err}")
        where = "in the YAML file" if "config file" in str(err) else "on the command line"
        known = list(Args.__dataclass_fields__)
        hints = [f"'{name}'{did_you_mean(name, known)}" for name in unknown]
        fail(f"Unknown setting {', '.join(hints)} {where}. Every setting is a field of Args "
             f"(`python {SCRIPT} --help` lists them).")
    except OSError as err:
        fail(f"--config: cannot read the YAML file ({err.strerror}: {err.filename}).")
    except yaml.YAMLError as err:  # what TRL's parser lets through from a file that is not YAML
        fail(f"--config: the file is not valid YAML: {' '.join(str(err).split())}.")
    return args


def did_you_mean(name: str, known: list) -> str:
    """The hint ' (did you mean X?)', X the first known name that begins with `name`, else the closest; or ''."""
    import difflib

    close = [k for k in known if k.startswith(name)] or difflib.get_close_matches(name, known, 1)
    return f" (did you mean {close[0]}?)" if close else ""


def fail(message: str):
    """Stop before (or without losing) any training, with one readable paragraph."""
    raise SystemExit("\nerror: " + textwrap.fill(" ".join(message.split()), width=110) + "\n")


def offline_hint(name: str) -> str:
    """For a hub id that could not load: the offline way to try the pipeline. Not for a local path: that is the
    user's own file (or the tiny preset's), and the tiny preset would not help."""
    if looks_local(name):
        return ""
    return f" `python {SCRIPT} --preset tiny` runs the whole pipeline offline on tiny local models."


def looks_local(name: str) -> bool:
    """A path, not a hub id (a hub id is NAME or OWNER/NAME)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.path.exists(name)


def is_gated(err: BaseException) -> bool:
    """A gated or forbidden hub repository: the hub's own error type or status code, anywhere in the chain."""
    import re

    from huggingface_hub.errors import GatedRepoError

    while err is not None:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(err, GatedRepoError) or status in (401, 403) or "gated repo" in str(err).lower() \
                or re.search(r"\b40[13] Client Error\b", str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def mistyped_path_hint(name: str) -> str:
    """For OWNER/NAME, which reads as a hub id, when OWNER is a local folder: a sentence saying it may be a
    mistyped path, with the closest path in that folder."""
    folder, _, rest = name.partition("/")
    if not rest or "/" in rest or not os.path.isdir(folder):
        return ""
    try:
        closest = did_you_mean(name, [f"{folder}/{entry}" for entry in sorted(os.listdir(folder))])
    except OSError:  # a folder this user may not list
        closest = ""
    return f" '{folder}' is a local folder, without '{rest}' in it: a mistyped path{closest or '?'}"


def explain_load_error(err: Exception, name: str, setting: str, related: Optional[str] = None) -> str:
    settings = f"--{setting}" + (f" and --{related}" if related else "")
    text = " ".join(f"{type(err).__name__}: {err}".split())
    hint = mistyped_path_hint(name)
    if is_gated(err):
        return (f"'{name}' (--{setting}) is a gated repository and this machine has no access to it: accept its "
                f"license on its hub page with your account, then give this machine your token "
                f"(`hf auth login`, or set HF_TOKEN). Or set --{setting} to an open model or a local "
                f"directory.{offline_hint(name)}")
    offline_markers = ("couldn't connect", "couldn't reach", "offline", "localentrynotfound", "connection")
    if any(marker in text.lower() for marker in offline_markers):
        return (f"Could not load '{name}' (--{setting}): the Hugging Face Hub cannot be reached and it is not in the "
                f"local cache.{hint} Connect to the internet, or download it elsewhere and set --{setting} to its "
                f"local directory.{offline_hint(name)}")
    return f"Could not load '{name}' ({settings}): {error_summary(err)}.{hint} Check {settings}.{offline_hint(name)}"


def error_summary(err: BaseException) -> str:
    """The first line of an error and of the error it was raised from: a broken file's own message (a JSON parse
    error, a truncated header) is often only in the cause."""
    def first_line(error: BaseException) -> str:  # a reader's bare StopIteration: it found nothing to read
        text = " ".join(str(error).strip().splitlines()[0].split()).rstrip(".") if str(error).strip() else ""
        empty = " (nothing was read: an empty file?)" if isinstance(error, StopIteration) else ""
        return text or type(error).__name__ + empty

    cause = err.__cause__
    return first_line(err) + (f" ({type(cause).__name__}: {first_line(cause)})" if cause is not None else "")


def load_or_explain(load, name: str, setting: str, related: Optional[str] = None):
    """Run `load(name)` and turn missing paths, gated repos and hub outages into one clear paragraph."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        fail(f"--{setting}={name!r} looks like a local path, but nothing exists there.")
    try:
        return load(os.path.expanduser(name) if looks_local(name) else name)
    except (MemoryError, torch.OutOfMemoryError, AttributeError, NameError, ImportError):
        raise  # not the file's fault: memory, or code that does not fit the installed libraries
    except Exception as err:  # hub and cache errors, and files that are empty, truncated or not what they claim
        fail(explain_load_error(err, name, setting, related))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_checked_tokenizer(name: str, setting: str, **kwargs):
    """The tokenizer saved with a model, refused when it cannot be the model's: transformers 5 builds an empty one
    from a directory without tokenizer files, and every text then maps to the same few ids. `kwargs` (such as
    padding_side) are given at load time, so that the saved tokenizer keeps them."""
    path = os.path.expanduser(name)
    if looks_local(name) and os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                                              for f in TOKENIZER_FILES):
        fail(f"'{name}' (--{setting}) holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the model's "
             f"tokenizer there too (tokenizer.save_pretrained), or set --{setting} to a directory that has both.")
    tokenizer = load_or_explain(lambda path: AutoTokenizer.from_pretrained(path, **kwargs), name, setting)
    vocab_size = getattr(load_or_explain(AutoConfig.from_pretrained, name, setting).get_text_config(), "vocab_size", 0)
    ordinary = len(set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids))
    if ordinary == 0 or (vocab_size and len(tokenizer) < vocab_size // 2):
        fail(f"The tokenizer in '{name}' (--{setting}) does not fit its model: {len(tokenizer)} tokens "
             f"({ordinary} of them ordinary) for an embedding table of {vocab_size}. Save the model's own tokenizer "
             f"there (tokenizer.save_pretrained), or set --{setting} to a directory that has both.")
    return tokenizer


def validate_common(args):
    """Settings every run needs right: numbers, tracker, device, resume, output dir."""
    import math

    for name, value in vars(args).items():  # nan passes every comparison a range check makes
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name} must be a finite number, got {value}.")
    if args.report_to not in ("wandb", "tensorboard", "none"):
        fail(f"--report_to must be wandb, tensorboard or none, got {args.report_to!r}.")
    import importlib.util

    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        fail(f"--report_to {args.report_to} needs the {args.report_to} package, which is not installed: "
             f"`pip install -r requirements.txt` (it pins it), or choose another --report_to.")
    if args.device not in ("auto", "cuda", "cpu"):
        fail(f"--device must be auto, cuda or cpu, got {args.device!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA device. Use --device auto or cpu.")
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume!r} is not a directory. Use --resume alone for the latest checkpoint in "
             f"--output_dir, or give a checkpoint-N directory.")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, f".write_test_{os.getpid()}")  # one per process: no race
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        problem = "is a file, not a directory" if os.path.isfile(args.output_dir) else f"is not writable ({err.strerror})"
        fail(f"--output_dir {args.output_dir!r} {problem}. Choose a directory you can write to.")


def check_hub_reachable(args, settings: list):
    """Without a connection, each hub load retries for about 20 seconds before it gives up. Ask once, quickly;
    if the hub cannot be reached, say so in one line and load from the local cache only (which fails fast)."""
    import socket
    import threading
    from urllib.parse import urlparse

    names = [getattr(args, setting) for setting in settings if getattr(args, setting)]
    if args.preset == "tiny" and args.tiny_assets_dir:  # its names are local, though built only after this check
        tiny = os.path.normpath(args.tiny_assets_dir) + os.sep
        names = [name for name in names if not os.path.normpath(name).startswith(tiny)]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    upload_later = "or drop --push_to_hub and upload the saved model after the run (`hf upload REPO OUTPUT_DIR`)"
    if args.push_to_hub:  # found out before training, not after it
        from huggingface_hub import get_token

        if offline:
            fail(f"--push_to_hub needs the Hugging Face Hub, and HF_HUB_OFFLINE is set. Unset it, {upload_later}.")
        if get_token() is None:
            fail(f"--push_to_hub needs a Hugging Face token on this machine, and there is none: log in (`hf auth "
                 f"login`) or set HF_TOKEN, {upload_later}.")
    if offline or (all(map(looks_local, names)) and not args.push_to_hub):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    reached = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=3).close()
            reached.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout=5)
    if not reached and args.push_to_hub:
        fail(f"--push_to_hub needs the Hugging Face Hub, and {host} cannot be reached from this machine. Connect, "
             f"{upload_later}.")
    if not reached:
        import datasets.config
        import huggingface_hub.constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        PartialState().print(f"The Hugging Face Hub ({host}) cannot be reached: loading from the local cache only.")


def push_to_hub(model, tokenizer, args) -> Optional[str]:
    """Upload the trained model and tokenizer, once eval.json is written. A push that fails (no connection, no
    rights to the repo) loses nothing: the paragraph returned says how to upload the saved files later, for the run
    to stop with once it has done the rest of what it was asked (None: pushed)."""
    repo = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        model.push_to_hub(repo)
        tokenizer.push_to_hub(repo)
        print(f"Pushed the trained model and tokenizer to the hub: {repo}")
        return None
    except Exception as err:  # any failure: what was trained is on disk either way
        # The push uploads the files at the top of the output dir; its folders (checkpoints, tiny assets, PPO's
        # value_model/, DPO's merged/, written after the push) hold what it did not, and stay out of the upload too.
        directory = args.output_dir
        entries = os.listdir(directory) if os.path.isdir(directory) else []
        folders = {"checkpoint-*" if name.startswith("checkpoint-") else name for name in entries
                   if os.path.isdir(os.path.join(directory, name))}
        folders |= {"merged"} if getattr(args, "merge_full_model", False) else set()
        excludes = "".join(f" --exclude '{folder}/*'" for folder in sorted(folders))
        return (f"--push_to_hub: uploading to '{repo}' failed ({type(err).__name__}: {error_summary(err)}). Nothing "
                f"is lost: the trained model and eval.json are saved in {args.output_dir!r}. Upload them once the hub "
                f"is reachable and you are logged in: `hf upload {repo} {shlex.quote(directory)}{excludes}`.")


def prepare_output_dir(args, checkpoint_marker: str) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh start. A finished run (eval.json, or a saved model whose
    evaluation was cut short) or an unfinished one (checkpoints) is never overwritten silently: a fresh start over
    it, or more training of a finished one, needs --overwrite_output_dir."""
    directory = args.output_dir
    checkpoints = [f"checkpoint-{step}" for step in checkpoint_steps(directory)]
    evaluated, saved_model = os.path.exists(os.path.join(directory, "eval.json")), saved_model_files(directory)
    finished = evaluated or bool(saved_model)
    what_finished = "a finished run (eval.json and the trained model)" if evaluated else \
        f"a trained model ({saved_model[0]}) whose evaluation was not written" if saved_model else ""
    if finished and args.resume and not args.overwrite_output_dir:  # it would train again over the finished model
        if args.resume == "latest" and not checkpoint_steps(directory, checkpoint_marker):
            fail(f"--output_dir {directory!r} holds {what_finished}, and no checkpoint to resume from (--save_steps). "
                 f"Nothing was changed. Choose another --output_dir, or start over there with --overwrite_output_dir "
                 f"(without --resume).")
        fail(f"--output_dir {directory!r} holds {what_finished}: resuming from one of its checkpoints would train "
             f"again over it. Nothing was changed. Drop --resume and choose another --output_dir, or add "
             f"--overwrite_output_dir to continue from that checkpoint and replace the finished model (its "
             f"{'eval.json and ' if evaluated else ''}saved models are deleted first).")
    if args.resume:
        if args.resume == "latest":
            complete = checkpoint_steps(directory, checkpoint_marker)
            if not complete:
                fail(f"--resume: no checkpoint of this script in --output_dir {directory!r} (a checkpoint-N directory "
                     f"with {checkpoint_marker}). Give the output dir of the interrupted run, or a checkpoint path.")
            checkpoint = os.path.join(directory, f"checkpoint-{complete[-1]}")
        else:
            checkpoint = args.resume
        check_checkpoint(checkpoint, checkpoint_marker)
        check_resume_settings(args, checkpoint)
        if finished:  # and --overwrite_output_dir: asked for, once the checkpoint is known to be sound
            PartialState().wait_for_everyone()
            if PartialState().is_main_process:
                kept = delete_finished_run(args)
                print(f"--overwrite_output_dir: deleted the finished run's eval.json and saved models{kept}; "
                      f"continuing from {checkpoint}.")
            PartialState().wait_for_everyone()
        record_settings(args)
        return checkpoint
    if (finished or checkpoints) and not args.overwrite_output_dir:
        what = what_finished if finished else f"checkpoints of an unfinished run ({', '.join(checkpoints[-3:])})"
        fail(f"--output_dir {directory!r} holds {what}; a new run would overwrite it. Nothing was changed. Choose "
             f"another --output_dir, {'' if finished else 'continue it with --resume, '}or pass "
             f"--overwrite_output_dir to start over (its eval.json, saved models and checkpoints are deleted).")
    PartialState().wait_for_everyone()  # every process has looked before the main one deletes anything
    if (finished or checkpoints) and PartialState().is_main_process:
        import shutil

        for name in checkpoints:
            shutil.rmtree(os.path.join(directory, name))
        kept = delete_finished_run(args)
        print(f"--overwrite_output_dir: deleted the earlier run's eval.json, saved models and {len(checkpoints)} "
              f"checkpoint(s){kept}.")
    PartialState().wait_for_everyone()
    record_settings(args)
    return None


def saved_model_files(directory: str) -> list:
    """The weight files a finished run saved in `directory` itself, by the names save_pretrained gives them (model,
    pytorch_model, adapter_model; shards and their index); its checkpoints keep their own in subfolders."""
    import re

    pattern = re.compile(r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
    return sorted(name for name in os.listdir(directory) if pattern.fullmatch(name))


def delete_finished_run(args) -> str:
    """A finished run's eval.json and saved weights (what marks the directory as holding one), and the models it
    saved in folders of their own (PPO's value_model/, DPO's merged/), which a new run might not write again. Never
    what a setting of this run loads from (--model_name_or_path pointing at the earlier run's model): those are kept,
    and named in the returned text."""
    import shutil

    directory = args.output_dir
    sources = [os.path.realpath(value) for name, value in vars(args).items()
               if name != "output_dir" and isinstance(value, str) and value and os.path.exists(value)]

    def loaded_by_this_run(path: str) -> bool:  # a model directory's own files, or a folder holding what is loaded
        path, is_file = os.path.realpath(path), os.path.isfile(path)
        return any(path == source or (is_file and os.path.dirname(path) == source)
                   or source.startswith(path + os.sep) for source in sources)

    kept = []
    for name in ["eval.json"] * os.path.exists(os.path.join(directory, "eval.json")) + saved_model_files(directory) \
            + [folder for folder in ("value_model", "merged") if os.path.isdir(os.path.join(directory, folder))]:
        path = os.path.join(directory, name)
        if name != "eval.json" and loaded_by_this_run(path):
            kept.append(name)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return f" (kept {', '.join(kept)}: this run loads from there)" if kept else ""


def record_settings(args):
    """The run's settings, in the output dir beside its checkpoints: what a resumed run is checked against."""
    if PartialState().is_main_process:
        write_json(os.path.join(args.output_dir, "settings.json"), vars(args))


def check_resume_settings(args, checkpoint: str):
    """Each of RESUME_MUST_MATCH as the run that wrote `checkpoint` had it (its output dir's settings.json; a run
    from before that file existed is not checked)."""
    path = os.path.join(os.path.dirname(os.path.normpath(checkpoint)), "settings.json")
    if not os.path.exists(path):
        return
    saved, now = read_json(path), vars(args)

    def comparable(settings: dict, name: str):  # the tiny preset's paths lie in its assets dir, wherever that is
        value, assets = settings[name], settings.get("tiny_assets_dir")
        return value.replace(assets, "{tiny}") if isinstance(value, str) and assets else value

    changed = [f"--{name} {saved[name]} -> {now[name]}" for name in RESUME_MUST_MATCH
               if name in saved and comparable(saved, name) != comparable(now, name)]
    if changed:
        fail(f"--resume {checkpoint!r}: the run that wrote it was trained with other settings ({'; '.join(changed)}), "
             f"and a resumed run ends where that run would only with the same ones. Nothing was loaded. Set them "
             f"back, or start a new run in another --output_dir.")


def checkpoint_steps(directory: str, marker: Optional[str] = None) -> list:
    """The N of each checkpoint-N folder in `directory`, in order; with `marker`, only folders that hold that file."""
    return sorted(int(name.split("-")[1]) for name in os.listdir(directory)
                  if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
                  and (marker is None or os.path.exists(os.path.join(directory, name, marker))))


def check_checkpoint(checkpoint: str, marker: str):
    """Every file of a checkpoint complete and readable, before any model is loaded; else say which file is
    broken and what to do. Reads headers and archive directories, not whole tensors."""
    import zipfile

    has_marker, inside = os.path.exists(os.path.join(checkpoint, marker)), checkpoint_steps(checkpoint, marker)
    if inside and not has_marker:
        fail(f"--resume {checkpoint!r} is a run's output dir, not one of its checkpoints. Nothing was loaded. Use "
             f"--resume alone with --output_dir {checkpoint!r} (its latest checkpoint), or --resume "
             f"{os.path.join(checkpoint, f'checkpoint-{inside[-1]}')}.")
    if not has_marker and not os.path.basename(os.path.normpath(checkpoint)).startswith("checkpoint-"):
        fail(f"--resume {checkpoint!r} is not a checkpoint of this script (it holds no {marker}). Nothing was "
             f"loaded. Give a checkpoint-N directory this script saved, or --resume alone for the latest one in "
             f"--output_dir.")
    broken = None if has_marker else f"{marker} is missing"
    for root, _, files in os.walk(checkpoint):
        for name in files if broken is None else []:
            path = os.path.join(root, name)
            try:
                if name.endswith(".safetensors"):
                    with open(path, "rb") as handle:
                        header_size = int.from_bytes(handle.read(8), "little")
                        header = json.loads(handle.read(header_size))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                    if os.path.getsize(path) < 8 + header_size + end:
                        raise ValueError("shorter than its header says (truncated)")
                elif name.endswith((".bin", ".pt", ".pth", ".pkl")):
                    zipfile.ZipFile(path).close()  # torch.save writes a zip archive; its directory is at the end
                elif name.endswith(".json"):
                    with open(path) as handle:
                        json.load(handle)
            except Exception as err:  # any failure to read means the file is broken
                broken = f"{os.path.relpath(path, checkpoint)} cannot be read ({type(err).__name__}: {err})"
    if broken:
        parent, name = os.path.split(os.path.normpath(checkpoint))
        step = int(name.split("-")[-1]) if name.split("-")[-1].isdigit() else None
        earlier = [other for other in checkpoint_steps(parent or ".", marker) if step is not None and other < step]
        earlier_hint = f"resume from an earlier one (--resume {os.path.join(parent, f'checkpoint-{earlier[-1]}')}), or " \
            if earlier else ""
        fail(f"The checkpoint {checkpoint!r} is incomplete or damaged: {broken}. Nothing was loaded: "
             f"{earlier_hint}start fresh with --overwrite_output_dir (without --resume).")


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def write_json(path: str, data: dict):
    """Write to a temporary file, then rename: a crash never leaves a half-written file under the real name."""
    with open(path + ".tmp", "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(path + ".tmp", path)


def save_atomically(accelerator, staging: str, final: str, save):
    """Write a checkpoint into `staging` with `save()`, then rename it to `final` once every process is done: a
    crash while saving never leaves a checkpoint that looks complete. A staging folder left by an earlier crash, and
    a checkpoint of the same name from before a run was continued from an earlier one, are replaced."""
    import shutil

    if accelerator.is_main_process and os.path.exists(staging):
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    save()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
    accelerator.wait_for_everyone()


class StopRequest:
    """Ctrl-C or SIGTERM, as a context manager around a run. While training, the first finishes the current step,
    saves a checkpoint and exits with 130 or 143; a second stops at once. While the trained model is being saved,
    the first lets the save finish. Otherwise one stops at once. Never with a traceback."""

    LEFT = {"setup": "Nothing was trained yet.",
            "training": "This step's checkpoint was not saved; earlier checkpoints are kept.",
            "saving": "The trained model may be partly written; the last checkpoint is kept: continue from it with "
                      "--resume --overwrite_output_dir (which deletes the partly written model).",
            "evaluation": "The trained model is saved in --output_dir and stays (a new run there needs "
                          "--overwrite_output_dir); the evaluation (eval.json) was not written.",
            "reporting": "The trained model and eval.json are saved; what came after them may be incomplete."}
    FINISHING = {"training": "finishing the current step, then saving a checkpoint",
                 "saving": "finishing saving the trained model, then stopping"}

    def __init__(self):
        self.signal_name, self.phase, self.previous = None, "setup", {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase in self.FINISHING and not self.signal_name:
            self.signal_name = name
            print(f"\n{name}: {self.FINISHING[self.phase]} (again to stop at once).", file=sys.stderr, flush=True)
            return
        self.signal_name = self.signal_name or name
        self.stop_now(f"\n{name}: stopped at once. {self.LEFT[self.phase]}")

    def requested(self) -> bool:
        """Whether any process was asked to stop. With several processes all must stop at the same step, and a
        launcher signals them one by one: they agree here, once per step, on the highest signal number seen."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            number = getattr(signal, self.signal_name) if self.signal_name else 0
            nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces GPU tensors only
            flag = torch.tensor([number], device=torch.cuda.current_device() if nccl else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not self.signal_name:
                self.signal_name = signal.Signals(int(flag.item())).name  # another process's signal stops this one
        return bool(self.signal_name)

    def enter(self, phase: str):
        """The run moves on to `phase`; a stop asked for while saving takes effect once the model is saved."""
        self.phase = phase
        if phase == "evaluation" and self.signal_name:
            self.stop_now(f"\nStopped by {self.signal_name}. {self.LEFT[phase]}")

    def stop_now(self, message: str):
        print(message, file=sys.stderr, flush=True)
        self.__exit__()
        raise SystemExit(128 + getattr(signal, self.signal_name))  # 130 Ctrl-C, 143 SIGTERM: the shell's convention

    def exit_after_checkpoint(self, when: str, checkpoint: str):
        """The interrupted run's checkpoint is saved: say how to continue, and exit with the signal's code."""
        how = f"set resume = {checkpoint!r} in Args and run again" if "ipykernel" in sys.modules else \
            f"  {resume_command(checkpoint)}"
        self.stop_now(f"\nStopped by {self.signal_name} {when}; checkpoint saved in {checkpoint}.\nResume with:\n{how}")


class ProgressFromTheResumedStep(ProgressCallback):
    """transformers' training progress bar, begun at the step a resumed run continues from. Its own begins at 0 and
    jumps there on the first step, so its first rate and time left counted every resumed step as done in that one
    (test_the_printed_resume_command_of_a_resumed_run_works_verbatim)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)
        self.current_step = state.global_step


def show_progress_from_the_resumed_step(trainer):
    """The trainer's progress bar replaced by ProgressFromTheResumedStep, in its place among the callbacks."""
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [ProgressFromTheResumedStep() if type(callback) is ProgressCallback else callback
                    for callback in callbacks]


def resume_command(checkpoint: str, argv: Optional[list] = None) -> str:
    """The command line of this run, resuming from `checkpoint`: launched the same way (as many processes), without
    its own --resume (bare, with a value or --resume=PATH) and without --overwrite_output_dir, which would delete
    the checkpoints."""
    argv, kept, skip = list(sys.argv[1:] if argv is None else argv), [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if flag in ("--resume", "--overwrite_output_dir", "--no_overwrite_output_dir"):
            skip = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        kept.append(token)
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    launcher = ["accelerate", "launch", "--num_processes", str(processes)] if processes > 1 else ["python"]
    return shlex.join([*launcher, SCRIPT, *kept, "--resume", checkpoint])


def prepare_tracking(args):
    """The tracker's project and entity; wandb without credentials logs offline (one line says so) instead of
    asking for a login."""
    if args.report_to != "wandb":
        return
    os.environ["WANDB_PROJECT"] = args.wandb_project  # read by transformers' wandb callback
    if args.wandb_entity:
        os.environ["WANDB_ENTITY"] = args.wandb_entity
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        PartialState().print("wandb: no credentials: logging offline to ./wandb (`wandb login`, then "
                             "`wandb sync ./wandb/offline-run-*` uploads it).")


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_run_if_open(args):
    if args.report_to != "wandb":
        return None
    import wandb

    return wandb.run


def log_evaluation(wandb_run, summary: dict, table: str, rows: list, columns: list):
    """The final evaluation on wandb, when a run is open: summary values and one table; then the run is closed."""
    if wandb_run is None:
        return
    import wandb

    for key, value in summary.items():
        wandb_run.summary[key] = value
    wandb_run.log({table: wandb.Table(columns=columns, data=rows)})
    wandb_run.finish()  # flush and close the run: the evaluation is the last thing it records


def on_gpu(args) -> bool:
    return args.device != "cpu" and torch.cuda.is_available()


def tf32_setting(args) -> Optional[bool]:
    """TrainingArguments' `tf32` (a process-wide matmul setting, which reaches trainers that build their own
    Accelerator): the choice where the GPU has TF32, else None, PyTorch's default (asking without TF32 raises)."""
    return args.tf32 if on_gpu(args) and is_torch_tf32_available() else None


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
# </shared plumbing>


# %% Appendix D: tiny offline preset: small models and data built here, saved to disk, and loaded back through the
# same code as a real run's.
SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the soundtrack", "the ending",
            "every scene", "the cast", "the direction", "the dialogue", "the camera work"]
GOOD = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "beautiful", "clever",
        "funny", "warm", "excellent"]
BAD = ["dull", "awful", "tedious", "clumsy", "boring", "lifeless", "terrible", "silly", "bland", "painful",
       "weak", "forgettable"]
OPENERS = ["I watched this on a rainy sunday afternoon.", "A friend lent me this one last week.",
           "I went in knowing nothing about it.", "We picked it at random from the shelf.",
           "It played late at night on television.", "My sister had been telling me about it for months."]
SENTENCES = ["{s} was {a}.", "I found {s} {a} and {b}.", "Honestly, {s} felt {a}.", "{s} is {a} from start to end.",
             "To me {s} seemed {a}, even {b}.", "Most of all, {s} was {a}."]
CLOSERS = {1: ["I would happily watch it again.", "Recommended to everyone.", "A real pleasure."],
           0: ["I would not watch it again.", "Skip this one.", "What a waste of an evening."]}


def synthetic_review(rng: random.Random, label: int) -> str:
    """A made-up review whose sentences mostly carry the label's sentiment (a few carry the other)."""
    parts = []
    for _ in range(rng.randint(2, 6)):
        words = GOOD if (rng.random() < 0.85) == bool(label) else BAD
        a, b = rng.sample(words, 2)
        sentence = rng.choice(SENTENCES).format(s=rng.choice(SUBJECTS), a=a, b=b)
        parts.append(sentence[0].upper() + sentence[1:])
    parts.insert(rng.randint(1, len(parts)), rng.choice(OPENERS))  # never first: prompts should reach sentiment
    parts.append(rng.choice(CLOSERS[label]))
    return " ".join(parts)


def build_tiny_assets(directory: str, seed: int = 0):
    """Reviews (train/test JSONL), a tiny byte-level BPE GPT-2 pretrained on them, and a tiny DistilBERT sentiment
    classifier with its own WordPiece tokenizer, trained on their labels. Skipped when already built."""
    marker = os.path.join(directory, "READY")
    if os.path.exists(marker):
        return
    from transformers import DistilBertConfig, GPT2Config

    print(f"Building the tiny preset's models and data in {directory} (once; under a minute) ...", flush=True)
    started = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    splits = {name: [(synthetic_review(rng, label), label) for label in [0, 1] * (n // 2)]
              for name, n in (("train", 2000), ("test", 400))}
    os.makedirs(os.path.join(directory, "reviews"), exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(directory, "reviews", f"{name}.jsonl"), "w") as handle:
            for text, label in rows:
                handle.write(json.dumps({"text": text, "label": label}) + "\n")
    texts = [text for text, _ in splits["train"]]

    gpt_tokenizer = build_policy_tokenizer(texts)
    gpt = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(gpt_tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=gpt_tokenizer.eos_token_id, eos_token_id=gpt_tokenizer.eos_token_id))
    encoded = [ids[:48] for ids in gpt_tokenizer(texts)["input_ids"]]
    fit(gpt, [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for ids in encoded], steps=300, lr=3e-3)
    gpt.save_pretrained(os.path.join(directory, "gpt2"))
    gpt_tokenizer.save_pretrained(os.path.join(directory, "gpt2"))

    # DistilBERT style classifier. POSITIVE is label 0 here, the reverse of lvwerra/distilbert-imdb, so code that
    # picked the class by position would train towards negative reviews.
    bert_tokenizer = build_classifier_tokenizer(texts)
    bert = AutoModelForSequenceClassification.from_config(DistilBertConfig(
        vocab_size=len(bert_tokenizer), max_position_embeddings=128, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
        pad_token_id=bert_tokenizer.pad_token_id, id2label={0: "POSITIVE", 1: "NEGATIVE"},
        label2id={"POSITIVE": 0, "NEGATIVE": 1}))
    encoded = bert_tokenizer([t for t, _ in splits["train"]], truncation=True, return_token_type_ids=False)["input_ids"]
    examples = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(1 - label)}
                for ids, (_, label) in zip(encoded, splits["train"])]
    fit(bert, examples, steps=200, lr=2e-3, pad_token_id=bert_tokenizer.pad_token_id)
    bert.save_pretrained(os.path.join(directory, "distilbert"))
    bert_tokenizer.save_pretrained(os.path.join(directory, "distilbert"))
    with open(marker, "w") as handle:
        handle.write(f"built in {time.time() - started:.1f}s\n")
    print(f"Built tiny models and data in {directory} ({time.time() - started:.1f}s)")


def build_policy_tokenizer(texts: list[str]):
    """GPT-2 style: byte-level BPE, EOS added after training so that id 0 is an ordinary token, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens(["<|endoftext|>"])
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos)


def build_classifier_tokenizer(texts: list[str]):
    """Lower-cased WordPiece with [CLS] ... [SEP], as DistilBERT's. The vocabulary is every word of `texts` plus
    every character alone and as a "##" continuation, so any word made of known characters (policies invent
    some) is split into pieces. Built here, not by tokenizers' WordPiece trainer, whose ties break differently in
    every build (measured: 5 different vocabularies in 5 builds), so the tiny rewards would differ between builds."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))})
    characters = sorted({character for word in words for character in word})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = dict.fromkeys(specials + words + characters + ["##" + c for c in characters])  # ordered, no repeats
    wordpiece = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    wordpiece.normalizer, wordpiece.pre_tokenizer, wordpiece.decoder = normalizer, splitter, decoders.WordPiece()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, wordpiece.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, model_max_length=128, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])


def fit(model, examples: list[dict], steps: int, lr: float, batch_size: int = 32, pad_token_id: int = 0):
    """A few hundred AdamW steps on padded mini-batches: enough to make the tiny models non-trivial."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = random.Random(step).sample(examples, batch_size)
        ids = torch.nn.utils.rnn.pad_sequence([e["input_ids"] for e in batch], batch_first=True,
                                              padding_value=pad_token_id)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(e["input_ids"]) for e in batch], batch_first=True)
        labels = torch.stack([e["labels"] for e in batch]) if batch[0]["labels"].dim() == 0 else \
            ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# %% Run: from the command line, or "Run all" in a notebook (which uses the constants as edited in Args)
if __name__ == "__main__":
    main(parse_args())
