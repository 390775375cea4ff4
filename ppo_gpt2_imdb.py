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
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental prints a warning on import

import numpy as np
import torch
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import TrlParser
from trl.experimental.ppo import PPOConfig, PPOTrainer


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
    reward_batch_size: int = arg(16, "texts per classifier forward pass")

    # Data
    dataset_name: str = arg("stanfordnlp/imdb", "review dataset: hub id or local directory")
    dataset_train_split: str = arg("train", "split the training prompts come from")
    dataset_eval_split: str = arg("test", "split the held-out evaluation prompts come from")
    text_column: str = arg("text", "column holding the review text")
    min_review_chars: int = arg(200, "keep only reviews longer than this many characters")
    prompt_min_tokens: int = arg(2, "shortest prompt, in policy tokens")
    prompt_max_tokens: int = arg(8, "longest prompt, in policy tokens (each prompt's length is drawn uniformly)")
    num_eval_prompts: int = arg(128, "held-out prompts scored before and after training")
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
    save_value_model: bool = arg(True, "also save the value model (to OUTPUT_DIR/value_model)")
    push_to_hub: bool = arg(False, "push the trained policy and tokenizer to the hub")
    hub_model_id: Optional[str] = arg(None, "hub repo for push_to_hub; None: the output dir's name")
    device: str = arg("auto", "auto (CUDA when present), cuda or cpu")
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
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # same seed for reference and trained policy: a paired comparison
    responses = []
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer.pad({"input_ids": prompts[start : start + args.batch_size]}, return_tensors="pt").to(device)
        output = model.generate(
            **batch, max_new_tokens=args.response_length, do_sample=True, top_k=0, top_p=1.0,
            temperature=args.temperature, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            responses.append([token for token in row[:end] if token != tokenizer.pad_token_id])
    torch.random.set_rng_state(generator_state)
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


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
class SentimentPPOTrainer(PPOTrainer):
    """TRL's PPO trainer, plus the rollout reward's spread in the logs (TRL logs only its mean)."""

    def log(self, logs: dict, *args, **kwargs):
        rewards = self.reward_model.pop_recent_rewards()
        if "objective/scores" in logs and len(rewards):
            rewards = self.accelerator.gather_for_metrics(rewards.to(self.accelerator.device))
            logs["objective/scores_std"] = rewards.float().std().item() if len(rewards) > 1 else 0.0
        super().log(logs, *args, **kwargs)

    def generate_completions(self, sampling: bool = False):
        super().generate_completions(sampling)
        self.reward_model.pop_recent_rewards()  # sample-table rewards are not rollout rewards


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


def build_ppo_config(args: Args, eval_size: int) -> PPOConfig:
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
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
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),  # TrainingArguments refuses bf16 on CPU
    )


def save_outputs(trainer, tokenizer, args: Args):
    """Policy + tokenizer (loadable with AutoModelForCausalLM.from_pretrained) and the value model."""
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        if args.save_value_model:
            value_model = trainer.accelerator.unwrap_model(trainer.model).value_model
            value_model.save_pretrained(os.path.join(args.output_dir, "value_model"))
    if args.push_to_hub:
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        repo = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        policy.push_to_hub(repo)
        tokenizer.push_to_hub(repo)


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
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DistilBertConfig, GPT2Config, PreTrainedTokenizerFast

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

    # GPT-2 style: byte-level BPE, EOS appended after training so that id 0 is an ordinary token, no pad token.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(["<|endoftext|>"])
    eos = "<|endoftext|>"
    gpt_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos)
    gpt = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(gpt_tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=gpt_tokenizer.eos_token_id, eos_token_id=gpt_tokenizer.eos_token_id))
    encoded = [ids[:48] for ids in gpt_tokenizer(texts)["input_ids"]]
    fit(gpt, [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for ids in encoded], steps=300, lr=3e-3)
    gpt.save_pretrained(os.path.join(directory, "gpt2"))
    gpt_tokenizer.save_pretrained(os.path.join(directory, "gpt2"))

    # DistilBERT style: lower-cased WordPiece with [CLS] ... [SEP]. POSITIVE is label 0 here, the reverse of
    # lvwerra/distilbert-imdb, so code that picked the class by position would train towards negative reviews.
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, wordpiece.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    bert_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, model_max_length=128, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])
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
    if args.preset == "tiny":
        build_tiny_assets(args.tiny_assets_dir, seed=0)
    set_seed(args.seed)
    prepare_tracking(args)
    started = time.time()

    tokenizer = load_policy_tokenizer(args)
    train_prompts, eval_prompts = load_prompts(args, tokenizer)
    policy, ref_policy, value_model = load_policy_models(args, tokenizer)
    reward = load_reward_model(args, tokenizer)
    print(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out prompts")

    config = build_ppo_config(args, eval_size=len(eval_prompts))
    trainer = SentimentPPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy, reward_model=reward,
        value_model=value_model, train_dataset=train_prompts.select_columns(["input_ids"]),
        eval_dataset=eval_prompts.select_columns(["input_ids"]))
    if args.sample_every > 0:
        trainer.sample_generations_freq = args.sample_every  # TRL spreads a fixed count; we want every N updates

    print("Scoring the reference policy on the held-out prompts ...")
    reference_result = evaluate(ref_policy, ref_policy, reward, tokenizer, eval_prompts, args)
    reward.pop_recent_rewards()
    print(f"Training: {config.num_total_batches} PPO updates of {args.batch_size} prompts on "
          f"{trainer.accelerator.device}")
    train_started = time.time()
    trainer.train()
    train_seconds = time.time() - train_started
    save_outputs(trainer, tokenizer, args)  # before evaluation: nothing trained is lost if it fails

    trained_policy = trainer.accelerator.unwrap_model(trainer.model).policy
    trained_result = evaluate(trained_policy, ref_policy, reward, tokenizer, eval_prompts, args)
    result = {"reference": reference_result, "trained": trained_result, "args": asdict(args),
              "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 2),
              "updates": config.num_total_batches,
              "seconds_per_update": round(train_seconds / config.num_total_batches, 4),
              "samples_per_second": round(config.num_total_batches * config.batch_size / train_seconds, 2),
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
