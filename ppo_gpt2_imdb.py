"""PPO fine-tunes GPT-2 (lvwerra/gpt2-imdb) to write positive IMDB movie reviews.

The policy continues the first 2-8 tokens of an IMDB review; a DistilBERT sentiment classifier
(lvwerra/distilbert-imdb) scores prompt + continuation, and its POSITIVE logit is the reward. TRL's PPO trainer
(trl 1.12, `trl.experimental.ppo`) trains the policy and a GPT-2 value model, with a KL penalty towards a frozen
copy of the starting policy.

    python ppo_gpt2_imdb.py --preset tiny --output_dir outputs/tiny   # offline, about a minute on a laptop CPU
    python ppo_gpt2_imdb.py                                           # the real run (GPU, hub access)
    python ppo_gpt2_imdb.py --learning_rate 1e-5 --config my.yaml     # any constant below, from CLI or YAML

Every constant lives in `Args` below; a preset only changes defaults, and explicit flags always win.
"""

import argparse
import copy
import json
import math
import os
import random
import signal
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Optional

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental prints a warning on import

import numpy as np
import torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, GenerationConfig, TrainerCallback)
from transformers.utils import is_torch_tf32_available
from trl import TrlParser
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo_module
from trl.trainer.utils import selective_log_softmax


def arg(default, help):
    """A dataclass field whose help text shows in `--help`."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------------
# Constants: edit these, or override any of them with `--name value` or a YAML file passed as `--config file.yaml`.
# Defaults follow TRL's gpt2-sentiment example.
# ----------------------------------------------------------------------------------------------------------------
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
    reward_batch_size: int = arg(128, "texts per classifier forward pass (one rollout batch in one pass on a GPU)")

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

    # PPO
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
    report_to: str = arg("wandb", "wandb, tensorboard or none")
    run_name: Optional[str] = arg(None, "run name on the tracker; None: generated")
    logging_steps: int = arg(1, "log metrics every N PPO updates")
    sample_every: int = arg(10, "log a table of (prompt, response, reward) samples every N PPO updates; 0: never")
    save_steps: int = arg(50, "save a resumable checkpoint every N PPO updates; 0: none (Ctrl-C still saves one)")
    resume: Optional[str] = arg(None, "continue from a checkpoint: 'latest' (bare --resume) or a checkpoint dir")
    save_value_model: bool = arg(True, "also save the value model (to OUTPUT_DIR/value_model)")
    push_to_hub: bool = arg(False, "push the trained policy and tokenizer to the hub")
    hub_model_id: Optional[str] = arg(None, "hub repo for push_to_hub; None: the output dir's name")
    device: str = arg("auto", "auto (CUDA when present), cuda or cpu")
    tf32: bool = arg(True, "on an Ampere or newer GPU, run fp32 matmuls on TF32 tensor cores (TRL's PPO ignores bf16)")
    free_memory_each_update: bool = arg(False, "let TRL run gc.collect() and empty the CUDA cache several times "
                                        "per update: lower peak memory for big models, slow for GPT-2")
    bf16_autocast: bool = arg(False, "on a GPU with bf16: the PPO epochs' policy and value passes under bf16 "
                              "autocast (weights, optimizer, rollout stay fp32). Off: slower at GPT-2 size (H200: "
                              "0.28 -> 0.32 s per update's epochs); no effect on a CPU")
    static_cache_generation: bool = arg(False, "rollouts decode with a static KV cache, which transformers compiles "
                                        "on a GPU. Off: 0.04 s faster per update on an H200 but 10-14 s to compile, "
                                        "more than it saves in one pass over IMDB (on a CPU: not compiled, no faster)")
    tiny_assets_dir: Optional[str] = arg(None, "with --preset tiny: where the tiny models and data are built")


# A preset changes only defaults. "{tiny}" stands for the directory the tiny assets are built in.
PRESETS = {
    "tiny": dict(
        model_name_or_path="{tiny}/gpt2",
        reward_model_name_or_path="{tiny}/distilbert",
        dataset_name="{tiny}/reviews",
        num_eval_prompts=64,
        learning_rate=1e-3,
        total_episodes=3072,
        batch_size=32,
        num_mini_batches=2,
        kl_coef=0.05,
        reward_batch_size=64,
        logging_steps=10,
        report_to="none",
        sample_every=0,
    )
}


def parse_args(argv=None) -> Args:
    """Parse CLI and YAML into `Args`; a preset's values become defaults so explicit flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, token in enumerate(argv):  # a bare --resume means the latest checkpoint in the output dir
        if token == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "latest")
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset", default=None, choices=[None, *PRESETS])
    preset = peek.parse_known_args(argv)[0].preset
    parser = TrlParser(Args)
    if preset:
        parser.set_defaults(**PRESETS[preset])
    (args,) = parser.parse_args_and_config(args=argv)
    if args.preset == "tiny":
        args.tiny_assets_dir = args.tiny_assets_dir or os.path.join(args.output_dir, "tiny_assets")
        for name, value in vars(args).items():
            if isinstance(value, str) and "{tiny}" in value:
                setattr(args, name, value.replace("{tiny}", args.tiny_assets_dir))
    return args


# ----------------------------------------------------------------------------------------------------------------
# Clear errors: one paragraph that names the setting to change, instead of a traceback from deep in a library.
# ----------------------------------------------------------------------------------------------------------------
def fail(message: str):
    """Stop before (or without losing) any training, with one readable paragraph."""
    raise SystemExit("\nerror: " + textwrap.fill(" ".join(message.split()), width=110) + "\n")


OFFLINE_HINT = "`python ppo_gpt2_imdb.py --preset tiny` runs the whole pipeline offline on tiny local models."


def looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def explain_load_error(err: Exception, name: str, setting: str) -> str:
    text = f"{type(err).__name__}: {err}"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "gated" in text.lower() or "401" in text or "403" in text:
        return (
            f"'{name}' (--{setting}) is a gated repository and this machine has no access: accept its terms on "
            f"its hub page, then `huggingface-cli login` or set HF_TOKEN, or point --{setting} at a model you can "
            f"read. {OFFLINE_HINT}"
        )
    offline_markers = ("couldn't connect", "couldn't reach", "offline", "localentrynotfound", "connection")
    if any(marker in text.lower() for marker in offline_markers):
        return (
            f"Could not load '{name}' (--{setting}): the Hugging Face Hub cannot be reached and it is not in the "
            f"local cache. Connect to the internet, or download it elsewhere and set --{setting} to its local "
            f"directory. {OFFLINE_HINT}"
        )
    return (
        f"Could not load '{name}' (--{setting}): {first_line} Check the name or path in --{setting}. {OFFLINE_HINT}"
    )


def load_or_explain(load, name: str, setting: str):
    """Run `load(name)` and turn missing paths, gated repos and hub outages into one clear paragraph."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        fail(f"--{setting}={name!r} looks like a local path, but nothing exists there. {OFFLINE_HINT}")
    try:
        return load(os.path.expanduser(name) if looks_local(name) else name)
    except (OSError, ValueError) as err:  # hub, cache and file errors are OSError subclasses in HF libraries
        fail(explain_load_error(err, name, setting))


def validate(args: Args):
    """Catch settings that cannot work before anything is loaded."""
    positive = dict(
        response_length=args.response_length, prompt_min_tokens=args.prompt_min_tokens, batch_size=args.batch_size,
        num_ppo_epochs=args.num_ppo_epochs, num_eval_prompts=args.num_eval_prompts, learning_rate=args.learning_rate,
        num_mini_batches=args.num_mini_batches, gradient_accumulation_steps=args.gradient_accumulation_steps,
        reward_batch_size=args.reward_batch_size, temperature=args.temperature, eval_batch_size=args.eval_batch_size,
        total_episodes=1 if args.total_episodes is None else args.total_episodes,
    )
    for name, value in positive.items():
        if not value > 0:
            fail(f"--{name} must be positive, got {value}.")
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
    if args.report_to not in ("wandb", "tensorboard", "none"):
        fail(f"--report_to must be wandb, tensorboard or none, got {args.report_to!r}.")
    if args.device not in ("auto", "cuda", "cpu"):
        fail(f"--device must be auto, cuda or cpu, got {args.device!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA device. Use --device auto or cpu.")
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume!r} is not a directory. Use --resume alone for the latest checkpoint in "
             f"--output_dir, or give a checkpoint-N directory.")
    check_writable(args.output_dir)


def check_writable(directory: str):
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_test_{os.getpid()}")  # one per process: no race
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        fail(f"--output_dir {directory!r} is not writable ({err.strerror}). Choose a directory you can write to.")


# ----------------------------------------------------------------------------------------------------------------
# Data: IMDB reviews -> prompts of 2-8 policy tokens. Held-out prompts come from the eval split.
# ----------------------------------------------------------------------------------------------------------------
def load_reviews(args: Args, split: str):
    """Load one split, rename the text column to `review` and keep reviews longer than `min_review_chars`."""
    dataset = load_or_explain(lambda name: load_dataset(name, split=split), args.dataset_name, "dataset_name")
    if args.text_column not in dataset.column_names:
        fail(f"The '{split}' split of '{args.dataset_name}' has no '{args.text_column}' column (it has: "
             f"{', '.join(dataset.column_names)}). Set --text_column to the column holding the review text.")
    dataset = dataset.rename_column(args.text_column, "review")
    dataset = dataset.filter(lambda review: len(review) > args.min_review_chars, input_columns="review")
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
    train_reviews = load_reviews(args, args.dataset_train_split)
    eval_reviews = load_reviews(args, args.dataset_eval_split)
    seen = set(train_reviews["review"])
    eval_reviews = eval_reviews.filter(lambda review: review not in seen, input_columns="review")
    eval_reviews = eval_reviews.shuffle(seed=args.seed).select(range(min(args.num_eval_prompts, len(eval_reviews))))
    train_prompts = make_prompts(train_reviews, tokenizer, args, seed=args.seed)
    eval_prompts = make_prompts(eval_reviews, tokenizer, args, seed=args.seed + 1)
    if len(train_prompts) < args.batch_size:
        fail(f"Only {len(train_prompts)} training prompts remain after filtering, fewer than one --batch_size "
             f"({args.batch_size}). Lower --batch_size or --min_review_chars.")
    return train_prompts, eval_prompts


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def load_policy_tokenizer(args: Args):
    tokenizer = load_or_explain(AutoTokenizer.from_pretrained, args.model_name_or_path, "model_name_or_path")
    tokenizer.padding_side = "left"  # generation continues from the right edge of each prompt
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # With pad = eos the trainer treats a generated EOS as padding: it is masked out and never learned.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def load_policy_models(args: Args, tokenizer):
    """Policy, a frozen reference copy of it, and a GPT-2 value model (same backbone + scalar head)."""
    policy = load_or_explain(AutoModelForCausalLM.from_pretrained, args.model_name_or_path, "model_name_or_path")
    value_name = args.value_model_name_or_path or args.model_name_or_path
    value_model = load_or_explain(
        lambda name: AutoModelForSequenceClassification.from_pretrained(name, num_labels=1),
        value_name, "value_model_name_or_path")
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


class DecodeAndClassify(torch.nn.Module):
    """Backbone of `SentimentReward`: policy token ids -> text -> classifier tokens -> one logit per sequence."""

    def __init__(self, classifier, classifier_tokenizer, policy_tokenizer, label_index: int, batch_size: int):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.classifier_tokenizer = classifier_tokenizer
        self.policy_tokenizer = policy_tokenizer
        self.label_index = label_index
        self.batch_size = batch_size
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
        return argparse.Namespace(hidden_states=(hidden,))


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


def load_reward_model(args: Args, policy_tokenizer) -> SentimentReward:
    name = args.reward_model_name_or_path
    classifier = load_or_explain(AutoModelForSequenceClassification.from_pretrained, name, "reward_model_name_or_path")
    classifier_tokenizer = load_or_explain(AutoTokenizer.from_pretrained, name, "reward_model_name_or_path")
    label2id = classifier.config.label2id or {}
    # By name, never by position: sorted pipeline outputs once made the anchor notebook read the wrong class.
    if args.positive_label not in label2id:
        fail(f"The classifier '{name}' has no label '{args.positive_label}' (its labels: {sorted(label2id)}). "
             f"Set --positive_label to the label whose logit should be the reward.")
    return SentimentReward(DecodeAndClassify(
        classifier, classifier_tokenizer, policy_tokenizer, label2id[args.positive_label], args.reward_batch_size))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: sample responses to the held-out prompts, score them with the same classifier, estimate the KL.
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[list[int]], args: Args, seed: int) -> list[list[int]]:
    """One sampled response per prompt (the rollouts' sampling: top_k=0, top_p=1), cut after the first EOS."""
    device = next(model.parameters()).device
    responses = []
    # Same seed for reference and trained policy (a paired comparison), without disturbing training's RNG.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), args.eval_batch_size):
            responses += sample_batch(model, tokenizer, prompts[start : start + args.eval_batch_size], args)
    return responses


def sample_batch(model, tokenizer, prompts: list[list[int]], args: Args) -> list[list[int]]:
    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(device)
    output = model.generate(
        **batch, max_new_tokens=args.response_length, do_sample=True, top_k=0, top_p=1.0,
        temperature=args.temperature, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    responses = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        responses.append([token for token in row[:end] if token != tokenizer.pad_token_id])
    return responses


@torch.no_grad()
def response_logprobs(model, prompts, responses, pad_token_id: int, temperature: float) -> torch.Tensor:
    """Sum over each response of log p(token | prompt, earlier tokens), at the sampling temperature."""
    device = next(model.parameters()).device
    totals = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
        picked = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None])
        totals.append(picked.sum())
    return torch.stack(totals).cpu() if totals else torch.zeros(0)


def evaluate(model, ref_policy, reward: SentimentReward, tokenizer, eval_prompts, args: Args) -> dict:
    """Reward statistics of `model` on the held-out prompts, with its KL to the reference on its own samples."""
    was_training = model.training
    model.eval()
    prompts = list(eval_prompts["input_ids"])  # datasets 5 returns a lazy Column
    responses = generate_responses(model, tokenizer, prompts, args, seed=args.seed + 2)
    rewards = reward.backbone.score_token_rows([p + r for p, r in zip(prompts, responses)]).cpu()
    kl = torch.zeros(len(prompts))
    if model is not ref_policy:
        kl = (response_logprobs(model, prompts, responses, tokenizer.pad_token_id, args.temperature)
              - response_logprobs(ref_policy, prompts, responses, tokenizer.pad_token_id, args.temperature))
    model.train(was_training)
    values = rewards.tolist()
    return {
        "reward_mean": statistics.fmean(values),
        "reward_median": statistics.median(values),
        "reward_std": statistics.pstdev(values),
        "kl_to_reference": kl.mean().item(),
        "num_prompts": len(values),
        "samples": [
            {"prompt": q, "response": tokenizer.decode(r, skip_special_tokens=True), "reward": v}
            for q, r, v in zip(list(eval_prompts["query"]), responses, values)
        ],
    }


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
    if wandb_run is not None:
        import wandb

        for name, result in (("reference", reference), ("trained", trained)):
            for key in ("reward_mean", "reward_median", "reward_std", "kl_to_reference"):
                wandb_run.summary[f"eval/{name}/{key}"] = result[key]
        rows = [[r["prompt"], r["response"], r["reward"], t["response"], t["reward"]]
                for r, t in zip(reference["samples"], trained["samples"])]
        columns = ["prompt", "reference response", "reference reward", "trained response", "trained reward"]
        wandb_run.log({"eval/samples": wandb.Table(columns=columns, data=rows)})
        wandb_run.finish()  # flush and close the run: the evaluation is the last thing it records


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
class SentimentPPOTrainer(PPOTrainer):
    """TRL's PPO trainer, plus in the logs the rollout reward's spread (TRL logs only its mean) and the wall time of
    each update's two phases: rollout (generation, reward, reference and value passes, advantages) and
    optimisation (the PPO epochs); and without TRL's per-update memory freeing unless asked for (see train())."""

    def __init__(self, *args, free_memory_each_update: bool = False, static_cache_generation: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.free_memory_each_update = free_memory_each_update  # see train()
        self.static_cache_generation = static_cache_generation  # see train()
        self.phase_seconds = {"rollout": [], "optimisation": []}  # one entry per update, in order
        self.phase_started = {}
        # The policy-and-value wrapper runs only in the PPO epochs: rollouts call the policy and value model apart.
        self.accelerator.unwrap_model(self.model).register_forward_pre_hook(self.optimisation_begins)

    def train(self):
        # TRL's loop runs gc.collect() twice and empties the CUDA cache about ten times per update, to keep big
        # models' peak memory down. For GPT-2 that costs more than it saves: one collect took 0.22 s on 2 CPU cores
        # (a tiny update went from 0.68 s to 0.22 s without them), and an emptied cache makes every update ask the
        # GPU driver for its memory again. Python's own collector still runs as usual.
        swapped = {}
        if not self.free_memory_each_update:
            swapped.update(gc=SimpleNamespace(collect=lambda *args: 0), empty_cache=lambda: None)
        saved = {name: getattr(trl_ppo_module, name) for name in swapped}
        vars(trl_ppo_module).update(swapped)
        generation_config = self.accelerator.unwrap_model(self.model).policy.generation_config
        cache_before = generation_config.cache_implementation
        if self.static_cache_generation:
            generation_config.cache_implementation = "static"  # TRL's rollout config leaves it unset: ours applies
        try:
            return super().train()
        finally:
            vars(trl_ppo_module).update(saved)
            generation_config.cache_implementation = cache_before

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
        super().log(logs, *args, **kwargs)

    def steady_phase_seconds(self) -> dict:
        """Mean seconds per update of each phase, leaving out the first update (warm-up) when there are others."""
        means = {}
        for phase, seconds in self.phase_seconds.items():
            steady = seconds[1:] or seconds
            means[f"{phase}_seconds_per_update"] = round(sum(steady) / len(steady), 4) if steady else None
        return means

    def generate_completions(self, sampling: bool = False):
        # Sample tables must not shift training's random numbers (a resumed run would diverge from the original).
        # Their batches have another shape than the rollouts': a static cache would be compiled again for them.
        generation_config = self.accelerator.unwrap_model(self.model).policy.generation_config
        cache_implementation, generation_config.cache_implementation = generation_config.cache_implementation, None
        try:
            with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
                super().generate_completions(sampling)
        finally:
            generation_config.cache_implementation = cache_implementation
        self.reward_model.pop_recent_rewards()  # sample-table rewards are not rollout rewards

    @torch.no_grad()
    def policy_ratio_error(self, queries: torch.Tensor) -> float:
        """Mean |ratio - 1| over response tokens at the first PPO epoch, before any optimizer step: the rollout's
        log-probabilities (from generation, in the load precision) against those of the PPO epochs' forward pass
        (the prepared model, under autocast where it is on), both through TRL's own functions. Ideally 0; bf16
        autocast makes it a little larger, and PPO's clipping (cliprange) sees that difference as policy change."""
        pad_token_id, temperature = self.processing_class.pad_token_id, self.args.temperature + 1e-7
        config = GenerationConfig(max_new_tokens=self.args.response_length, temperature=temperature, top_k=0.0,
                                  top_p=1.0, do_sample=True)
        policy = self.accelerator.unwrap_model(self.model).policy
        queries = queries.to(self.accelerator.device)
        context = queries.shape[1]
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
            query_responses, logits = trl_ppo_module.batch_generation(policy, queries, len(queries), pad_token_id,
                                                                      config)
        responses = query_responses[:, context:]
        rollout = selective_log_softmax(logits, responses)
        output, _ = trl_ppo_module.forward(self.model, query_responses, pad_token_id)
        epoch = selective_log_softmax(output.logits[:, context - 1 : -1].float() / temperature, responses)
        # Tokens up to and including the first EOS; TRL masks what follows.
        valid = torch.cumsum((responses == self.processing_class.eos_token_id).long(), 1) \
            - (responses == self.processing_class.eos_token_id).long() == 0
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


class StopRequest:
    """First Ctrl-C or SIGTERM: finish the current update, save a checkpoint and exit. A second one stops at once."""

    def __init__(self):
        self.signal_name = None
        self.previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signal_name:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: finishing this update, then saving a checkpoint (again to stop at once).",
              file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + getattr(signal, self.signal_name)  # 130 for Ctrl-C, 143 for SIGTERM: the shell's convention


class Stopped(Exception):
    """Raised after the checkpoint of an interrupted run is saved (TRL's PPO loop has no stop flag of its own)."""


class Checkpoints(TrainerCallback):
    """Saves what a faithful continuation needs, every `save_steps` updates and when a stop is requested: policy and
    value model, optimizer, learning-rate schedule, every RNG (accelerate's save_state), and the update and episode
    counters. On resume, restores the counters that TRL's loop resets when it starts."""

    def __init__(self, trainer, args: Args, stop: StopRequest):
        self.trainer, self.args, self.stop = trainer, args, stop
        self.resumed: Optional[dict] = None  # the counters of the checkpoint this run continues from
        trainer.accelerator.register_for_checkpointing(trainer.lr_scheduler)

    def save(self, state) -> str:
        directory = os.path.join(self.args.output_dir, f"checkpoint-{state.global_step}")
        self.trainer.accelerator.save_state(directory, safe_serialization=False)  # GPT-2 ties two weights
        if self.trainer.accelerator.is_main_process:
            with open(os.path.join(directory, "counters.json"), "w") as handle:
                json.dump({"global_step": state.global_step, "episode": state.episode}, handle)
        self.trainer.accelerator.wait_for_everyone()
        return directory

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resumed:
            state.global_step, state.episode = self.resumed["global_step"], self.resumed["episode"]
            state.max_steps = self.resumed["global_step"] + args.num_total_batches

    def on_step_end(self, args, state, control, **kwargs):
        periodic = self.args.save_steps > 0 and state.global_step % self.args.save_steps == 0
        if periodic or self.stop.signal_name:
            directory = self.save(state)
            if self.stop.signal_name:
                raise Stopped(directory)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    steps = [int(name.split("-")[1]) for name in os.listdir(output_dir)
             if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
             and os.path.exists(os.path.join(output_dir, name, "counters.json"))] if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def resolve_checkpoint(args: Args) -> Optional[str]:
    if args.resume is None:
        return None
    checkpoint = latest_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
    if checkpoint is None or not os.path.exists(os.path.join(checkpoint, "counters.json")):
        fail(f"--resume: no checkpoint of this script in {checkpoint or args.output_dir!r} (a checkpoint-N "
             f"directory with counters.json). Give the output dir of the interrupted run, or a checkpoint path.")
    return checkpoint


def resume_command(checkpoint: str) -> str:
    kept = [a for a in sys.argv[1:] if a != "--resume"]
    return " ".join(["python", os.path.basename(sys.argv[0]), *kept, "--resume", checkpoint])


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


def prepare_tracking(args: Args):
    """wandb without credentials and without a terminal would wait forever on a login prompt: go offline."""
    if args.report_to == "wandb" and not os.environ.get("WANDB_MODE") and not wandb_has_credentials() \
            and not sys.stdin.isatty():
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no credentials and no terminal to ask for them: logging offline to ./wandb "
              "(`wandb sync` uploads it later).")


def on_gpu(args: Args) -> bool:
    return args.device != "cpu" and torch.cuda.is_available()


def bf16_autocast(args: Args) -> bool:
    return args.bf16_autocast and on_gpu(args) and torch.cuda.is_bf16_supported()


def tf32_setting(args: Args) -> Optional[bool]:
    """TrainingArguments' `tf32` (a process-wide matmul setting, so TRL's own Accelerator does not undo it): the
    choice where the GPU has TF32, else None, PyTorch's default (asking for TF32 without it raises)."""
    return args.tf32 if on_gpu(args) and is_torch_tf32_available() else None


def build_ppo_config(args: Args, eval_size: int) -> PPOConfig:
    gpu = on_gpu(args)
    return PPOConfig(
        output_dir=args.output_dir,
        seed=args.seed,
        learning_rate=args.learning_rate,
        total_episodes=args.total_episodes,
        num_train_epochs=1,  # used only when total_episodes is None: one pass over the prompts
        per_device_train_batch_size=args.batch_size // args.gradient_accumulation_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_mini_batches=args.num_mini_batches,
        num_ppo_epochs=args.num_ppo_epochs,
        kl_coef=args.kl_coef,
        cliprange=args.cliprange,
        cliprange_value=args.cliprange_value,
        vf_coef=args.vf_coef,
        gamma=args.gamma,
        lam=args.lam,
        response_length=args.response_length,
        temperature=args.temperature,
        stop_token="eos",
        local_rollout_forward_batch_size=args.batch_size,
        per_device_eval_batch_size=min(16, eval_size),
        num_sample_generations=1 if args.sample_every > 0 else 0,  # > 0 turns the sample tables on
        report_to=args.report_to,
        run_name=args.run_name,
        logging_steps=args.logging_steps,
        save_strategy="no",
        dataset_num_proc=args.dataset_num_proc,
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),  # TrainingArguments refuses bf16 on CPU
        tf32=tf32_setting(args),
    )


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
        if args.push_to_hub:
            repo = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
            unwrapped.policy.push_to_hub(repo)
            tokenizer.push_to_hub(repo)
    trainer.accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------
# Tiny offline preset: small models and data built here, saved to disk, and loaded back through the same code.
# ----------------------------------------------------------------------------------------------------------------
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
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
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


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    validate(args)
    # The first PartialState fixes the process group; on a machine without GPUs it must be told to use the CPU, or
    # processes started by `accelerate launch`/torchrun would each train alone.
    PartialState(cpu=not on_gpu(args))
    if args.preset == "tiny":
        with PartialState().main_process_first():  # with several processes, one builds and the others reuse
            build_tiny_assets(args.tiny_assets_dir, seed=0)
    checkpoint = resolve_checkpoint(args)
    set_seed(args.seed)
    prepare_tracking(args)
    stop = StopRequest()
    stop.install()
    try:
        return train_and_evaluate(args, checkpoint, stop)
    finally:
        stop.uninstall()


def train_and_evaluate(args: Args, checkpoint: Optional[str], stop: StopRequest) -> dict:
    started = time.time()
    say = PartialState().print  # progress lines from the main process only
    tokenizer = load_policy_tokenizer(args)
    with PartialState().main_process_first():  # one process fills the datasets cache, the others read it
        train_prompts, eval_prompts = load_prompts(args, tokenizer)
    policy, ref_policy, value_model = load_policy_models(args, tokenizer)
    reward = load_reward_model(args, tokenizer)
    say(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out prompts")

    config = build_ppo_config(args, eval_size=len(eval_prompts))
    if bf16_autocast(args):
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"  # read by the Accelerator that TRL's trainer builds
    train_ids = train_prompts.select_columns(["input_ids"])
    trainer = SentimentPPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy, reward_model=reward,
        value_model=value_model, train_dataset=train_ids,
        eval_dataset=eval_prompts.select_columns(["input_ids"]), free_memory_each_update=args.free_memory_each_update,
        static_cache_generation=args.static_cache_generation)
    if args.sample_every > 0:
        trainer.sample_generations_freq = args.sample_every  # TRL spreads a fixed count; we want every N updates
    total_updates = config.num_total_batches

    ratio_queries = tokenizer.pad({"input_ids": list(eval_prompts["input_ids"])[: args.batch_size]},
                                  return_tensors="pt")["input_ids"]
    ratio_error = trainer.policy_ratio_error(ratio_queries)
    say("Scoring the reference policy on the held-out prompts ...")
    reference_result = evaluate(ref_policy, ref_policy, reward, tokenizer, eval_prompts, args)
    reward.pop_recent_rewards()

    checkpoints = Checkpoints(trainer, args, stop)  # registers the schedule with accelerate's save/load_state
    done = 0  # updates already trained, by the run this one resumes
    if checkpoint:
        trainer.accelerator.load_state(checkpoint)  # weights, optimizer, schedule and every RNG
        with open(os.path.join(checkpoint, "counters.json")) as handle:
            checkpoints.resumed = json.load(handle)
        done = checkpoints.resumed["global_step"]
        config.num_total_batches = total_updates - done  # TRL's loop runs this many updates
    trainer.add_callback(checkpoints)
    trainer.dataloader = trainer.timed(ResumableBatches(
        train_ids, config.local_batch_size, DataCollatorWithPadding(tokenizer), args.seed,
        trainer.accelerator.process_index, trainer.accelerator.num_processes, first_update=done))
    if stop.signal_name:
        fail(f"Stopped by {stop.signal_name} before training began: nothing to save.")
    say(f"Training: {total_updates} PPO updates of {args.batch_size} prompts per process on "
        f"{trainer.accelerator.num_processes} x {trainer.accelerator.device}"
        + (f", resuming after update {done} from {checkpoint}" if checkpoint else ""))
    train_started = time.time()
    try:
        trainer.train()
    except Stopped as stopped:
        print(f"\nStopped by {stop.signal_name} after update {trainer.state.global_step} of {total_updates}; "
              f"checkpoint saved in {stopped}.\nResume with:\n  {resume_command(str(stopped))}",
              file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code)
    train_seconds = time.time() - train_started
    updates_run = total_updates - done
    save_outputs(trainer, tokenizer, args)  # before evaluation: nothing trained is lost if it fails

    trained_policy = trainer.accelerator.unwrap_model(trainer.model).policy
    trained_result = evaluate(trained_policy, ref_policy, reward, tokenizer, eval_prompts, args)
    result = {"reference": reference_result, "trained": trained_result, "args": asdict(args),
              "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 2),
              "updates": total_updates, "updates_this_run": updates_run,
              "seconds_per_update": round(train_seconds / max(updates_run, 1), 4),
              "samples_per_second": round(updates_run * config.batch_size / train_seconds, 2),
              **trainer.steady_phase_seconds(), "policy_ratio_error": round(ratio_error, 6),
              "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
              if torch.cuda.is_available() else None}
    if trainer.accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as handle:
            json.dump(result, handle, indent=2)
        wandb_run = None
        if args.report_to == "wandb":
            import wandb

            wandb_run = wandb.run
        report(reference_result, trained_result, wandb_run)
        print(f"Saved the policy, tokenizer and eval.json to {args.output_dir} ({result['seconds']}s)")
    return result


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


if __name__ == "__main__":
    main()
