"""PPO fine-tunes GPT-2 (lvwerra/gpt2-imdb) to write positive IMDB movie reviews.

The policy continues the first 2-8 tokens of an IMDB review; a DistilBERT sentiment classifier
(lvwerra/distilbert-imdb) scores prompt + continuation, and its POSITIVE logit is the reward. TRL's PPO trainer
(trl 1.12, `trl.experimental.ppo`) trains the policy and a GPT-2 value model, with a KL penalty towards a frozen
copy of the starting policy.

    python ppo_gpt2_imdb.py --preset tiny --output_dir outputs/tiny   # offline, about a minute on a laptop CPU
    python ppo_gpt2_imdb.py                                           # the real run (GPU, hub access)
    python ppo_gpt2_imdb.py --learning_rate 1e-5                      # any constant below, from the command line

The constants in `Args` are the interface: edit them, or override any with `--name value`. As a notebook (`# %%`
cells), "Run all" trains with the constants as edited. The appendices are machinery.
"""

# %% Imports (each appendix imports what only it needs)
import copy
import logging
import os
import signal
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental prints a warning on import
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # a CPU kernels notice; no 4-bit here
warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|generation_config).*", category=FutureWarning)

import numpy as np
import torch
from accelerate import PartialState
from datasets import load_dataset
from datasets.utils.logging import disable_progress_bar
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed
from transformers.utils import logging as transformers_logging
from trl.experimental.ppo import PPOConfig

disable_progress_bar()  # datasets' per-map bars; the script says in one line what each step kept
transformers_logging.set_verbosity_error()  # load reports and deprecation notices; errors still show
transformers_logging.disable_progress_bar()  # weight-loading bars (training's own bar is on: disable_tqdm)
SCRIPT = "ppo_gpt2_imdb.py"


def arg(default, help):  # a dataclass field whose help text shows in `--help`
    return field(default=default, metadata={"help": help})


# %% Settings: the constants of a run. Defaults follow TRL's gpt2-sentiment example.
@dataclass
class Args:
    preset: Optional[Literal["tiny"]] = arg(None, "tiny: build tiny local models and data and run offline on a CPU")
    seed: int = arg(0, "seed for data sampling, initialisation and generation: a run is reproducible from it")
    output_dir: str = arg("outputs/ppo_gpt2_imdb", "where the policy, value model, tokenizer and eval.json go")

    # Models
    model_name_or_path: str = arg("lvwerra/gpt2-imdb", "policy to train: hub id or local directory")
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
    eval_batch_size: int = arg(64, "prompts per generation batch in evaluation")
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
    kl_coef: float = arg(0.2, "weight of the per-token KL penalty to the reference")
    cliprange: float = arg(0.2, "PPO policy ratio clip")
    cliprange_value: float = arg(0.2, "value prediction clip")
    vf_coef: float = arg(0.1, "value loss weight")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")

    # Tracking and saving
    report_to: Literal["wandb", "tensorboard", "none"] = arg("wandb", "tracker; without credentials wandb logs offline")
    wandb_project: str = arg("ppo_gpt2_imdb", "wandb project the run is logged to")
    wandb_entity: Optional[str] = arg(None, "wandb team or user; None: your default entity")
    run_name: Optional[str] = arg(None, "run name on the tracker; None: generated")
    logging_steps: int = arg(1, "log metrics every N PPO updates, and at the last")
    sample_every: int = arg(10, "log a table of (prompt, response, reward) samples every N PPO updates; 0: never")
    save_steps: int = arg(50, "save a resumable checkpoint every N PPO updates; 0: none (Ctrl-C still saves one)")
    resume: Optional[str] = arg(None, "continue from a checkpoint: 'latest' (bare --resume) or a checkpoint dir")
    overwrite_output_dir: bool = arg(False, "start over: delete the output dir's eval.json, models and checkpoints")
    save_value_model: bool = arg(True, "also save the value model (to OUTPUT_DIR/value_model)")

    # System and speed (the last three: the GPU layout, used on a GPU only)
    device: Literal["auto", "cuda", "cpu"] = arg("auto", "auto: CUDA when present")
    tf32: bool = arg(True, "on an Ampere or newer GPU, run fp32 matmuls on TF32 tensor cores")
    static_cache_generation: bool = arg(True, "rollouts decode into one static KV cache, compiled")
    compile_ppo_epochs: bool = arg(True, "torch.compile (reduce-overhead: CUDA graphs) the PPO epochs' forward passes")
    bf16_autocast: bool = arg(True, "the PPO epochs' forward passes under bf16 autocast")
    tiny_assets_dir: Optional[str] = arg(None, "with --preset tiny: where the tiny models and data are built")


# A preset changes only defaults (explicit flags win) and prints what it changed. "{tiny}" stands for the
# directory the tiny assets are built in. The tiny run is too short to earn back a GPU's compilation.
PRESETS = {
    "tiny": dict(model_name_or_path="{tiny}/gpt2", reward_model_name_or_path="{tiny}/distilbert",
                 dataset_name="{tiny}/reviews", num_eval_prompts=64, learning_rate=5e-4, total_episodes=3072,
                 batch_size=32, num_mini_batches=2, kl_coef=0.1, reward_batch_size=64, logging_steps=10,
                 sample_every=0, static_cache_generation=False, compile_ppo_epochs=False),
}


# %% 1. Data: IMDB reviews -> prompts of 2-8 policy tokens. Held-out prompts come from the eval split.
def load_reviews(args: Args, split: str, setting: str):  # keeping reviews longer than `min_review_chars`
    dataset = load_or_explain(lambda name: load_dataset(name, split=split), args.dataset_name, "dataset_name",
                              related=setting)
    check_text_column(args, dataset, split)
    read = len(dataset)
    dataset = dataset.rename_column(args.text_column, "review")
    dataset = dataset.filter(lambda review: isinstance(review, str) and review.strip() != "", input_columns="review")
    no_text = read - len(dataset)
    dataset = dataset.filter(lambda review: len(review) > args.min_review_chars, input_columns="review")
    counts = (f"dropped {no_text} with no text and {read - no_text - len(dataset)} of --min_review_chars "
              f"{args.min_review_chars} or fewer")
    PartialState().print(f"{split}: kept {len(dataset)} of {read} reviews; {counts}")
    check_reviews_left(args, split, counts, len(dataset))
    return dataset


def make_prompts(dataset, tokenizer, args: Args, seed: int):  # each review cut to its first k tokens
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
    train_prompts = make_prompts(train_reviews, tokenizer, args, seed=args.seed)
    check_prompts(args, held_out=len(eval_reviews), prompts=len(train_prompts))
    eval_reviews = eval_reviews.shuffle(seed=args.seed).select(range(min(args.num_eval_prompts, len(eval_reviews))))
    eval_prompts = make_prompts(eval_reviews, tokenizer, args, seed=args.seed + 1)
    PartialState().print(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out prompts")
    return train_prompts, eval_prompts


# %% 2. Models and reward: policy, frozen reference copy, GPT-2 value model, and the classifier's POSITIVE logit.
def load_policy_tokenizer(args: Args):
    # Left padding: generation continues from the right edge of each prompt. Given at load time, it is saved too.
    tokenizer = load_checked_tokenizer(args.model_name_or_path, "model_name_or_path", padding_side="left")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # With pad = eos the trainer treats a generated EOS as padding: it is masked out and never learned.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def load_policy_models(args: Args, tokenizer):  # policy, frozen reference copy, value model (backbone + scalar head)
    policy = load_or_explain(AutoModelForCausalLM.from_pretrained, args.model_name_or_path, "model_name_or_path")
    # The policy's own backbone under a new scalar head: it reads the policy's token ids.
    value_model = load_or_explain(lambda name: AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=1), args.model_name_or_path, "model_name_or_path")
    for model in (policy, value_model):
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))  # room for the added [PAD]
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.use_cache = False  # TRL's training passes never read a KV cache (generate keeps its own)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    check_context_length(args, policy.config)
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy, ref_policy, value_model


def load_reward_model(args: Args, policy_tokenizer) -> "SentimentReward":  # the `positive_label` logit
    name = args.reward_model_name_or_path
    check_reward_model(args, load_or_explain(AutoConfig.from_pretrained, name, "reward_model_name_or_path"))
    classifier = load_or_explain(AutoModelForSequenceClassification.from_pretrained, name, "reward_model_name_or_path")
    # By name, never by position: sorted pipeline outputs once made the anchor notebook read the wrong class.
    label_index = classifier.config.label2id[args.positive_label]
    classifier_tokenizer = load_checked_tokenizer(name, "reward_model_name_or_path")
    return SentimentReward(classifier, classifier_tokenizer, policy_tokenizer, label_index, args.reward_batch_size)


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
        tf32=args.tf32 if gpu and is_torch_tf32_available() else None,  # asking for TF32 where there is none raises
    )


# %% 4. Train: the recipe in order. main() runs every stage; 5 and 6 are the functions below it.
def main(args: Args) -> dict:  # trains and evaluates as `args` says; returns what eval.json holds
    started = time.time()
    # 0. Before anything is loaded: refuse settings that cannot work, protect finished runs, seed, pick the tracker.
    validate(args)
    with StopRequest() as stop:  # Ctrl-C or SIGTERM, from here to the end: see Appendix C
        PartialState(cpu=not on_gpu(args))  # the first PartialState fixes the process group: CPU without a GPU
        checkpoint = prepare_output_dir(args, checkpoint_marker="counters.json")
        if args.preset == "tiny":
            with PartialState().main_process_first():  # after the refusals; one process builds, others reuse
                build_tiny_assets(args.tiny_assets_dir, seed=0)
        set_seed(args.seed)
        prepare_tracking(args)

        # 1. Data
        tokenizer = load_policy_tokenizer(args)
        with PartialState().main_process_first():  # one process fills the datasets cache, the others read it
            train_prompts, eval_prompts = load_prompts(args, tokenizer)

        # 2. Models and reward
        policy, ref_policy, value_model = load_policy_models(args, tokenizer)
        reward = load_reward_model(args, tokenizer)

        # 3. Trainer, set up for resume, interrupts, sample tables and speed in its constructor (Appendix A)
        trainer = SentimentPPOTrainer(
            args=build_ppo_config(args, eval_size=len(eval_prompts)), processing_class=tokenizer, model=policy,
            ref_model=ref_policy, reward_model=reward, value_model=value_model,
            train_dataset=train_prompts.select_columns(["input_ids"]),
            eval_dataset=eval_prompts.select_columns(["input_ids"]), settings=args, checkpoint=checkpoint, stop=stop)

        # 4. Train, then save the trained policy at once: nothing trained is lost if anything later fails
        PartialState().print(training_line(args, trainer, checkpoint))
        stop.enter("training")
        train_started = time.time()
        trainer.train()  # a stop request exits after the update's checkpoint, saying how to resume
        train_seconds, updates_run = time.time() - train_started, trainer.total_updates - trainer.updates_done
        stop.enter("saving")
        save_outputs(trainer, tokenizer, args)
        stop.enter("evaluation")

        # 5. Evaluate the reference and the trained policy on the same held-out prompts, with the same seed
        PartialState().print(f"Evaluating the reference and the trained policy on {len(eval_prompts)} prompts ...")
        trained_policy = trainer.accelerator.unwrap_model(trainer.model).policy
        reference_result = evaluate(ref_policy, ref_policy, reward, tokenizer, eval_prompts, args)
        trained_result = evaluate(trained_policy, ref_policy, reward, tokenizer, eval_prompts, args)

        # 6. Report: eval.json, the table and the tracker's summary
        result = {"reference": reference_result, "trained": trained_result, "args": asdict(args),
                  "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 2),
                  "updates": trainer.total_updates, "updates_this_run": updates_run,
                  "samples_per_second": round(updates_run * trainer.args.batch_size / train_seconds, 2),
                  "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu(args) else None}
        if PartialState().is_main_process:
            save_atomically(args.output_dir, lambda to: write_json(f"{to}/eval.json", result), "eval.json", False)
            stop.enter("reporting")
            report(reference_result, trained_result, args)
            print(f"Saved the policy, tokenizer and eval.json to {args.output_dir} ({result['seconds']}s)")
    return result


# %% 5. Evaluate: sample responses to the held-out prompts, score them with the classifier, estimate the KL.
def generate_responses(model, tokenizer, prompts: list[list[int]], args: Args, seed: int) -> list[list[int]]:
    """One sampled response per prompt (the rollouts' sampling: top_k=0, top_p=1), up to its first EOS."""
    responses = []
    # Same seed for reference and trained policy (a paired comparison), without disturbing training's RNG.
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), args.eval_batch_size):
            batch = tokenizer.pad({"input_ids": prompts[start : start + args.eval_batch_size]},
                                  return_tensors="pt").to(model.device)
            output = model.generate(**batch, max_new_tokens=args.response_length, do_sample=True, top_k=0, top_p=1.0,
                                    temperature=args.temperature, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)  # pads each row after its first EOS
            for row in output[:, batch["input_ids"].shape[1] :].tolist():
                responses.append([token for token in row if token != tokenizer.pad_token_id])
    return responses


@torch.no_grad()
def response_logprobs(model, prompts, responses, temperature: float) -> torch.Tensor:
    """Sum over each response of log p(token | prompt, earlier tokens), at the sampling temperature."""
    totals = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
        totals.append(torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None]).sum())
    return torch.stack(totals).cpu() if totals else torch.zeros(0)


def evaluate(model, ref_policy, reward: "SentimentReward", tokenizer, eval_prompts, args: Args) -> dict:
    """Reward statistics of `model` on the held-out prompts, and its KL to the reference on its own samples."""
    was_training = model.training
    model.eval()
    prompts = list(eval_prompts["input_ids"])  # datasets 5 returns a lazy Column
    responses = generate_responses(model, tokenizer, prompts, args, seed=args.seed + 2)
    rewards = reward.score_token_rows([p + r for p, r in zip(prompts, responses)]).cpu().tolist()
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


# %% 6. Report: the before/after table, and the tracker's summary.
def report(reference: dict, trained: dict, args: Args):
    print("\n=== Held-out evaluation ===============================================")
    print(f"{'':10} {'reward mean':>12} {'reward median':>14} {'KL to ref':>10}")
    for name, result in (("reference", reference), ("trained", trained)):
        print(f"{name:10} {result['reward_mean']:12.3f} {result['reward_median']:14.3f} "
              f"{result['kl_to_reference']:10.3f}")
    rows = [[r["prompt"], r["response"], r["reward"], t["response"], t["reward"]]
            for r, t in zip(reference["samples"], trained["samples"])]
    for prompt, ref_response, ref_reward, response, reward in rows[:5]:
        print(f"\nprompt:    {prompt!r}\nreference: {ref_response!r}  [{ref_reward:+.2f}]")
        print(f"trained:   {response!r}  [{reward:+.2f}]")
    print("=======================================================================\n")
    summary = {f"eval/{name}/{key}": result[key] for name, result in (("reference", reference), ("trained", trained))
               for key in ("reward_mean", "reward_median", "reward_std", "kl_to_reference")}
    log_evaluation(args, summary, "eval/samples", rows,
                   ["prompt", "reference response", "reference reward", "trained response", "trained reward"])


# %% Appendix A: TRL 1.12 workarounds, and the GPU layout. Every contact with a library's internals, and why:
# - the reward model interface: TRL calls `score(backbone(policy ids))`; DistilBERT has its own tokenizer
# - the module globals `gc` and `empty_cache` of trl.experimental.ppo.ppo_trainer, swapped while `train` runs: TRL
#   collects garbage twice and empties the CUDA cache about ten times per update, which costs GPT-2 more than it saves
# - the trainer's `dataloader`: a resumable batch order (TRL reshuffles from the global RNG and cannot resume);
#   `args.num_total_batches` shortened on resume; the trainer, its own callback, saves checkpoints and stops
# - `log`, `generate_completions`, `sample_generations_freq`: episodes per second of this run, logging every
#   logging_steps, sample tables every N updates without shifting training's RNG
# - ACCELERATE_MIXED_PRECISION while TRL builds its Accelerator (it passes none): bf16 autocast in the PPO epochs
# - on a GPU, the policy's `generate` while training (rollouts decode into one static cache) and the forward of
#   TRL's policy-and-value wrapper (compiled, after one eager call)
# - save_outputs: not TRL's save_model, which fails with several processes
import itertools
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

from accelerate.utils import patch_environment
from transformers import DataCollatorWithPadding, StaticCache, TrainerCallback
from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo_module


class SentimentReward(torch.nn.Module):
    """The classifier's logit for one label, behind TRL's reward-model interface: TRL calls `score(getattr(model,
    model.base_model_prefix)(input_ids=..., attention_mask=..., ...).hidden_states[-1])`."""

    base_model_prefix = "backbone"
    backbone = property(lambda self: self)  # what TRL calls: this module, which decodes and classifies

    def __init__(self, classifier, classifier_tokenizer, policy_tokenizer, label_index: int, batch_size: int):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.classifier_tokenizer, self.policy_tokenizer = classifier_tokenizer, policy_tokenizer
        self.label_index, self.batch_size = label_index, batch_size
        self.score = torch.nn.Identity()

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.classifier.parameters()).device
        logits = [torch.zeros(0, device=device)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.classifier_tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                              return_tensors="pt", return_token_type_ids=False).to(device)
            logits.append(self.classifier(**batch).logits[:, self.label_index].float())
        return torch.cat(logits)

    def score_token_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """Reward of each sequence of policy tokens (special tokens such as EOS and PAD are dropped)."""
        return self.score_texts(self.policy_tokenizer.batch_decode(rows, skip_special_tokens=True))

    def forward(self, input_ids, attention_mask, **unused):
        # The trainer writes 0 over pad positions, and 0 is a real GPT-2 token ("!"): keep only attended positions,
        # with one copy to the host for the whole batch.
        rows = [[token for token, keep in zip(ids, mask) if keep]
                for ids, mask in zip(input_ids.tolist(), attention_mask.bool().tolist())]
        scores = self.score_token_rows(rows)
        # TRL reads `score(hidden_states[-1])` at each sequence's last token: broadcast the score over positions.
        return SimpleNamespace(hidden_states=(scores.view(-1, 1, 1).expand(-1, input_ids.shape[1], 1),))


class SentimentPPOTrainer(PPOTrainer, TrainerCallback):
    """TRL's PPO trainer with the workarounds listed above: resume, stop, sample tables and the GPU layout. It is its
    own first callback: it saves checkpoints, and restores the counters that TRL's loop resets when it starts."""

    def __init__(self, *args, settings: Args, checkpoint: Optional[str], stop: "StopRequest", **kwargs):
        bf16 = settings.bf16_autocast and on_gpu(settings) and torch.cuda.is_bf16_supported()
        with patch_environment(ACCELERATE_MIXED_PRECISION="bf16") if bf16 else nullcontext():  # for this trainer only
            super().__init__(*args, **kwargs)
        self.settings, self.gpu_layout = settings, on_gpu(settings)  # static cache and compilation need a GPU
        self.sample_generations_freq = settings.sample_every  # TRL spreads a fixed count; we want every N
        self.total_updates, self.updates_done = self.args.num_total_batches, 0
        self.stop, self.resumed = stop, None  # resumed: the counters of the checkpoint this run continues from
        self.accelerator.register_for_checkpointing(self.lr_scheduler)  # the schedule, in accelerate's save_state
        if checkpoint:
            self.accelerator.load_state(checkpoint)  # weights, optimizer, schedule and every RNG
            self.resumed = json.loads(pathlib.Path(checkpoint, "counters.json").read_text())
            self.updates_done = self.resumed["global_step"]
            self.args.num_total_batches = self.total_updates - self.updates_done  # TRL's loop runs this many
        self.callback_handler.callbacks.insert(0, self)  # first: the progress bar sees restored counters
        padded = self.gpu_layout and (settings.compile_ppo_epochs or settings.static_cache_generation)
        collator = DataCollatorWithPadding(self.processing_class, padding="max_length" if padded else True,
                                           max_length=settings.prompt_max_tokens if padded else None)  # one shape
        self.dataloader = ResumableBatches(self.train_dataset, self.args.local_batch_size, collator, settings.seed,
                                           self.accelerator.process_index, self.accelerator.num_processes,
                                           self.updates_done)
        self.rollout_cache: Optional[StaticCache] = None  # allocated on first use, once for the run
        if settings.compile_ppo_epochs and self.gpu_layout:
            compile_ppo_epochs(self.accelerator.unwrap_model(self.model))

    def train(self):
        keep = dict(gc=SimpleNamespace(collect=lambda *args: 0), empty_cache=lambda: None)  # no freeing: see above
        saved = {name: getattr(trl_ppo_module, name) for name in keep}
        vars(trl_ppo_module).update(keep)
        try:
            with self.rollout_generation():
                return super().train()
        finally:
            vars(trl_ppo_module).update(saved)

    def rollout_generation(self):
        """With --static_cache_generation on a GPU, rollouts decode into one static cache for the run, compiled."""
        if not (self.settings.static_cache_generation and self.gpu_layout):
            return nullcontext()
        policy = self.accelerator.unwrap_model(self.model).policy
        if self.rollout_cache is None:
            self.rollout_cache = StaticCache(config=policy.config,
                                             max_cache_len=self.settings.prompt_max_tokens + self.args.response_length)
        return rollouts_decode_into(self.rollout_cache, policy, batch_size=self.args.local_rollout_forward_batch_size,
                                    prompt_width=self.settings.prompt_max_tokens,
                                    response_length=self.args.response_length)

    def log(self, logs: dict, *args, **kwargs):
        if "objective/scores" in logs:  # TRL logs once per update, right after the PPO epochs
            if self.resumed and self.state.episode:  # TRL divides every episode, those of the run
                done = self.resumed["episode"]  # resumed too, by this run's time: 5x too high at first
                logs["eps"] = int(logs.get("eps", 0) * (self.state.episode - done) / self.state.episode)
            if self.state.global_step % self.args.logging_steps and self.state.global_step != self.total_updates:
                return  # TRL logs every update, whatever logging_steps says; the last update is always logged
        super().log(logs, *args, **kwargs)

    def generate_completions(self, sampling: bool = False):
        # Sample tables must not shift training's random numbers (a resumed run would diverge from the original).
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
            super().generate_completions(sampling)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resumed:
            state.global_step, state.episode = self.resumed["global_step"], self.resumed["episode"]
            state.max_steps = self.resumed["global_step"] + args.num_total_batches

    def on_step_end(self, args, state, control, **kwargs):
        """Every `save_steps` updates and on a stop request, what a faithful continuation needs: policy and value
        model, optimizer, schedule, every RNG (accelerate's save_state), and the update and episode counters. TRL's
        PPO loop has no stop flag: a stop exits here, after the save."""
        accelerator, step = self.accelerator, state.global_step
        stopping = self.stop.requested(accelerator)
        if not stopping and not (self.settings.save_steps and step % self.settings.save_steps == 0):
            return
        name = f"checkpoint-{step}"

        def save(staging: str):
            accelerator.save_state(os.path.join(staging, name), safe_serialization=False)  # GPT-2 ties two weights
            if accelerator.is_main_process:
                write_json(f"{staging}/{name}/counters.json", {"global_step": step, "episode": state.episode})

        save_atomically(self.settings.output_dir, save, name)
        if stopping:
            self.stop.exit_after_checkpoint(f"after update {step} of {state.max_steps}",
                                            os.path.join(self.settings.output_dir, name))


class ResumableBatches:
    """Prompt batches in a fixed order per (seed, epoch), each process taking its own slice, from any update."""

    def __init__(self, dataset, batch_size: int, collator, seed: int, rank: int, world_size: int, first_update: int):
        self.dataset, self.batch_size, self.collator = dataset, batch_size, collator
        self.seed, self.rank, self.world_size, self.first_update = seed, rank, world_size, first_update
        self.updates_per_epoch = len(dataset) // (batch_size * world_size)

    def __iter__(self):
        for update in itertools.count(self.first_update):
            epoch, index = divmod(update, self.updates_per_epoch)
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
            start = (index * self.world_size + self.rank) * self.batch_size
            yield self.collator([self.dataset[i] for i in order[start : start + self.batch_size].tolist()])


def save_outputs(trainer, tokenizer, args: Args):
    """Policy + tokenizer (from_pretrained loads them) and the value model; TRL's save_model saves DDP's wrapper."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)

    def save(staging: str):
        if trainer.accelerator.is_main_process:
            unwrapped.policy.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if args.save_value_model:
                unwrapped.value_model.save_pretrained(os.path.join(staging, "value_model"))

    save_atomically(args.output_dir, save, "the trained policy")


def training_line(args: Args, trainer, checkpoint: Optional[str]) -> str:
    """What the run is about to do; on a GPU, that the first update compiles (a long first step is not a hang)."""
    compiles = trainer.gpu_layout and (args.static_cache_generation or args.compile_ppo_epochs)
    return (f"Training: {trainer.total_updates} PPO updates of {args.batch_size} prompts per process on "
            f"{trainer.accelerator.num_processes} x {trainer.accelerator.device}"
            + (f", resuming after update {trainer.updates_done} from {checkpoint}" if checkpoint else "")
            + ("; the first update also compiles (a minute or so, once)" if compiles else ""))


@contextmanager
def rollouts_decode_into(cache: StaticCache, policy, batch_size: int, prompt_width: int, response_length: int):
    """While open, the policy's `generate` decodes every rollout-shaped call into `cache`, zeroed in place before
    each call (transformers compiles a static-cache decode on a GPU); calls of other shapes keep the dynamic cache.
    transformers 5 would allocate a new static cache on every call, and the compiled decode records its CUDA graphs
    again whenever a cache tensor's address changes."""
    generate, defaults = policy.generate, policy.generation_config
    # A model's own default cache_implementation would clash with a cache passed in.
    cache_implementation, defaults.cache_implementation = defaults.cache_implementation, None

    def generate_into_one_cache(input_ids=None, generation_config=None, **kwargs):
        if input_ids is not None and tuple(input_ids.shape) == (batch_size, prompt_width) \
                and getattr(generation_config, "max_new_tokens", None) == response_length:
            cache.reset()
            kwargs["cache"] = cache
        return generate(input_ids=input_ids, generation_config=generation_config, **kwargs)

    policy.generate = generate_into_one_cache
    try:
        yield cache
    finally:
        del policy.generate  # back to the class's method
        defaults.cache_implementation = cache_implementation


def compile_ppo_epochs(wrapper, mode: str = "reduce-overhead"):
    """Compiles the forward (and so the backward) of TRL's policy-and-value wrapper, which only the PPO epochs call.
    transformers 5 installs its output-capturing hooks on a model's first call, under a threading lock that
    torch.compile cannot trace: one eager call first, or the graph breaks there."""
    device = next(wrapper.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        trl_ppo_module.forward(wrapper, torch.ones((1, 2), dtype=torch.long, device=device), pad_token_id=-1)
    wrapper.forward = torch.compile(wrapper.forward, mode=mode)


# %% Appendix B: this script's checks: one paragraph naming the setting to change, as early as the facts are known.
# Settings that shape training's course: a resumed run must use those its checkpoint's run used (settings.json in
# the output dir), or it would end where neither run would. The others (tracking, saving, speed) may change.
RESUME_MUST_MATCH = ("model_name_or_path", "reward_model_name_or_path", "positive_label", "dataset_name",
                     "dataset_train_split", "text_column", "seed", "batch_size", "num_mini_batches",
                     "gradient_accumulation_steps", "num_ppo_epochs", "learning_rate", "total_episodes", "kl_coef",
                     "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", "response_length", "temperature",
                     "prompt_min_tokens", "prompt_max_tokens", "min_review_chars")


def validate(args: Args):
    positive = ["response_length", "prompt_min_tokens", "batch_size", "num_ppo_epochs", "num_eval_prompts",
                "learning_rate", "num_mini_batches", "gradient_accumulation_steps", "reward_batch_size", "temperature",
                "eval_batch_size", "total_episodes", "logging_steps", "cliprange", "cliprange_value"]
    check_ranges(args, positive, at_least_0=["save_steps", "sample_every", "kl_coef", "vf_coef"],
                 fractions=["gamma", "lam"])
    if args.prompt_max_tokens < args.prompt_min_tokens:
        fail(f"--prompt_max_tokens ({args.prompt_max_tokens}) is below --prompt_min_tokens ({args.prompt_min_tokens}).")
    for name in ("gradient_accumulation_steps", "num_mini_batches"):
        if args.batch_size % getattr(args, name):
            fail(f"--batch_size ({args.batch_size}) must be a multiple of --{name} ({getattr(args, name)}).")
    if args.num_mini_batches > 1 and args.gradient_accumulation_steps > 1:
        # TRL 1.12 steps the optimizer every `gradient_accumulation_steps` micro-batches counted across the whole
        # rollout batch, so with both > 1 it accumulates over several mini-batches: fewer, larger steps than asked.
        fail("--num_mini_batches and --gradient_accumulation_steps cannot both be above 1 with TRL 1.12's PPO "
             "trainer (it would accumulate gradients across mini-batches). Set one of them to 1.")
    validate_common(args)


def check_text_column(args: Args, dataset, split: str):
    if args.text_column not in dataset.column_names:
        fail(f"The '{split}' split of '{args.dataset_name}' has no '{args.text_column}' column (it has: "
             f"{', '.join(dataset.column_names)}). Set --text_column to the column holding the review text.")


def check_reviews_left(args: Args, split: str, counts: str, kept: int):
    if kept == 0:
        fail(f"No review is left in the '{split}' split of '{args.dataset_name}': {counts}. Set --text_column to the "
             f"column holding the review text ('{args.text_column}' now), or lower --min_review_chars.")


def check_prompts(args: Args, held_out: int, prompts: int):  # reviews left for evaluation, prompts for training
    if held_out == 0:
        fail(f"No held-out review is left: every review of the '{args.dataset_eval_split}' split "
             f"(--dataset_eval_split) is also in the '{args.dataset_train_split}' split the policy trains on. Set "
             f"--dataset_eval_split to a split of other reviews (IMDB: test).")
    processes = PartialState().num_processes
    if prompts < args.batch_size * processes:
        fail(f"Only {prompts} training prompts remain after filtering, fewer than one --batch_size "
             f"({args.batch_size}) for each of {processes} process(es). Lower --batch_size or --min_review_chars.")


def check_context_length(args: Args, config):
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if context and args.prompt_max_tokens + args.response_length > context:
        fail(f"--prompt_max_tokens + --response_length ({args.prompt_max_tokens} + {args.response_length}) exceeds "
             f"the policy's context of {context} tokens. Lower one of them.")


def check_reward_model(args: Args, config):
    """A sequence classifier with a label named --positive_label, known from its config before any weight loads."""
    name, kinds = args.reward_model_name_or_path, config.architectures or []
    if not any(kind.endswith("ForSequenceClassification") for kind in kinds):
        fail(f"The reward model '{name}' (--reward_model_name_or_path) is a {', '.join(kinds) or config.model_type}, "
             f"not a sequence classifier: the reward is a sentiment classifier's logit. Set "
             f"--reward_model_name_or_path to a classifier such as lvwerra/distilbert-imdb.")
    if args.positive_label not in (config.label2id or {}):
        fail(f"The classifier '{name}' has no label '{args.positive_label}' (its labels: {sorted(config.label2id)}). "
             f"Set --positive_label to the label whose logit should be the reward.")


# <shared plumbing>
# %% Appendix C: shared plumbing, identical in both scripts (a test compares them) and inlined so that each runs
# copied alone. Only what the pinned libraries do not do: presets, one-paragraph errors, overwrite protection, the
# settings a resume must match, saves that never look complete before they are, the resume command, the stop handler
# and wandb's offline fallback. It reads the script's own `Args`, `PRESETS`, `RESUME_MUST_MATCH` and `SCRIPT`.
import argparse
import errno
import importlib.util
import json
import math
import netrc
import pathlib
import re
import shlex
import shutil
import tempfile
import textwrap

from accelerate.utils import gather_object
from huggingface_hub.errors import GatedRepoError
from huggingface_hub.utils import logging as hub_logging
from transformers import AutoTokenizer, HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_torch_tf32_available

hub_logging.set_verbosity_error()  # the hub client's retry lines: a load that fails is said in one paragraph


def parse_args(argv: Optional[list] = None) -> Args:
    """`Args`: flags win over a preset, a preset over the constants. A notebook ignores its kernel's argv."""
    argv = [str(token) for token in (([] if "ipykernel" in sys.modules else sys.argv[1:]) if argv is None else argv)]
    parser = HfArgumentParser(Args, allow_abbrev=False)  # --learning_rat is a typo, not --learning_rate
    parser.error = lambda message: fail(f"{message.rstrip('.')}. `python {SCRIPT} --help` lists every setting.")
    for action in parser._actions:
        if action.dest == "resume":  # a bare --resume means the latest checkpoint in the output dir
            action.nargs, action.const = "?", "latest"
        if action.option_strings[0].startswith("--no_"):  # transformers gives --no_X the help of --X
            action.help, action.default = f"turn --{action.option_strings[0][5:]} off", argparse.SUPPRESS
    base = Args(**vars(parser.parse_args(argv)))
    if not base.preset:
        return base
    assets = base.tiny_assets_dir or os.path.join(base.output_dir, "tiny_assets")
    preset = {name: value.replace("{tiny}", assets) if isinstance(value, str) else value
              for name, value in PRESETS[base.preset].items()}
    parser.set_defaults(**preset, tiny_assets_dir=assets)
    args = Args(**vars(parser.parse_args(argv)))
    changed = [f"{name} {getattr(base, name)} -> {getattr(args, name)}" for name in preset
               if getattr(args, name) != getattr(base, name)]
    if changed and os.environ.get("RANK", "0") == "0":  # before any process group exists: the launcher's rank
        print(f"preset {args.preset} changes: {', '.join(changed)}")
    return args


def fail(message: str, command: str = ""):
    """Stop before (or without losing) any training, with one readable paragraph and a command to copy, if any."""
    command = f"\n  {command}" if command else ""
    paragraph = textwrap.fill(" ".join(message.split()), width=110, break_on_hyphens=False, break_long_words=False)
    raise SystemExit("\nerror: " + paragraph + command + "\n")


def looks_local(name: str) -> bool:  # a hub id is NAME or OWNER/NAME
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.path.exists(name)


def load_or_explain(load, name: str, setting: str, related: Optional[str] = None):
    """`load(name)`, or one paragraph naming the setting, with the library's own message of what went wrong."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        fail(f"--{setting}={name!r} looks like a local path, but nothing exists there.")
    try:
        return load(os.path.expanduser(name))
    except (MemoryError, torch.OutOfMemoryError, AttributeError, NameError, ImportError):
        raise  # not the file's fault: memory, or code that does not fit the installed libraries
    except Exception as err:
        settings = f"--{setting}" + (f" and --{related}" if related else "")
        gated = any(isinstance(error, GatedRepoError) for error in (err, err.__cause__, err.__context__))
        access = " It is gated: accept its license on its hub page, then log in here (`hf auth login`, or set " \
            "HF_TOKEN)." if gated else ""
        tiny = "" if looks_local(name) else f" `python {SCRIPT} --preset tiny` runs the whole pipeline offline."
        fail(f"Could not load '{name}' ({settings}): {error_summary(err)}.{access} Check {settings}.{tiny}")


def error_summary(err: BaseException) -> str:  # with its cause's: a broken file's own message is often there
    lines = [" ".join(f"{type(e).__name__}: {e}".split("\n")[0].split()) for e in (err, err.__cause__) if e]
    return " <- ".join(line.rstrip(":.") for line in lines)


def load_checked_tokenizer(name: str, setting: str, **kwargs):
    """The tokenizer saved with a model (`kwargs` such as padding_side are saved with it). From a directory without
    tokenizer files transformers 5 fails, or builds an empty one that maps every text to the same few ids: refused."""
    tokenizer = load_or_explain(lambda path: AutoTokenizer.from_pretrained(path, **kwargs), name, setting)
    if not set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids):
        fail(f"'{name}' (--{setting}) holds no tokenizer (tokenizer.json, vocab files): save the model's tokenizer "
             f"there too (tokenizer.save_pretrained), or set --{setting} to a directory that has both.")
    return tokenizer


def validate_common(args):
    for name, value in vars(args).items():  # nan passes every comparison a range check makes
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name} must be a finite number, got {value}.")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        fail(f"--report_to {args.report_to} needs the {args.report_to} package, which is not installed: "
             f"`pip install -r requirements.txt` (it pins it), or choose another --report_to.")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA device. Use --device auto or cpu.")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()  # this process may write there
    except OSError as err:
        problem = "is a file, not a directory" if os.path.isfile(args.output_dir) else f"cannot be written to ({err})"
        fail(f"--output_dir {args.output_dir!r} {problem}. Choose a directory you can write to.")


def check_ranges(args, positive: list, at_least_0: list = (), fractions: list = ()):
    """Each named setting positive, 0 or more, or between 0 and 1 (or None: unset)."""
    for names, fits, what in ((positive, lambda v: v > 0, "positive"), (at_least_0, lambda v: v >= 0, "0 or more"),
                              (fractions, lambda v: 0 <= v <= 1, "between 0 and 1")):
        for name in names:
            if getattr(args, name) is not None and not fits(getattr(args, name)):
                fail(f"--{name} must be {what}, got {getattr(args, name)}.")


def prepare_output_dir(args, checkpoint_marker: str) -> Optional[str]:
    """The checkpoint to resume from, or None. A finished run (eval.json or a saved model) or an unfinished one
    (checkpoints) is never overwritten silently; the settings are recorded for a resume to be checked against."""
    directory, latest = args.output_dir, get_last_checkpoint(args.output_dir)
    finished = ", ".join(finished_run_files(directory))
    if finished and args.resume and not args.overwrite_output_dir:  # it would train again over the finished model
        fail(f"--output_dir {directory!r} holds a finished run ({finished}): resuming from "
             f"{'one of its checkpoints' if latest else 'a checkpoint (it kept none: --save_steps)'} would train "
             f"again over it. Nothing was changed. Choose another --output_dir, or add --overwrite_output_dir to "
             f"replace the finished model (without --resume: start over).")
    if args.resume:
        checkpoint = latest if args.resume == "latest" else args.resume
        if not checkpoint:
            fail(f"--resume: no checkpoint of this script in --output_dir {directory!r} (a checkpoint-N directory "
                 f"with {checkpoint_marker}). Give the output dir of the interrupted run, or a checkpoint path.")
        inside = get_last_checkpoint(checkpoint) if os.path.isdir(checkpoint) else None  # an output dir given
        if inside or not os.path.exists(os.path.join(checkpoint, checkpoint_marker)):
            fail(f"--resume {checkpoint!r} is not a checkpoint of this script (a checkpoint-N folder with "
                 f"{checkpoint_marker}). Nothing was loaded. Use --resume alone for the latest one in --output_dir, "
                 f"or --resume {inside or 'with a checkpoint-N path'}.")
        check_resume_settings(args, checkpoint)
    elif (finished or latest) and not args.overwrite_output_dir:
        what = f"a finished run ({finished})" if finished else \
            f"checkpoints of an unfinished run (the latest: {os.path.basename(latest)})"
        fail(f"--output_dir {directory!r} holds {what}; a new run would overwrite it. Nothing was changed. Choose "
             f"another --output_dir, {'' if finished else 'continue it with --resume, '}or pass "
             f"--overwrite_output_dir to start over (its eval.json, saved models and checkpoints are deleted).")
    state = PartialState()
    state.wait_for_everyone()  # every process has looked before the main one deletes anything
    if (finished or (latest and not args.resume)) and state.is_main_process:
        checkpoints = [] if args.resume else [name for name in os.listdir(directory)
                                               if re.fullmatch(r"checkpoint-\d+", name)]
        for name in checkpoints:
            shutil.rmtree(os.path.join(directory, name))
        print(f"--overwrite_output_dir: deleted the earlier run's eval.json, saved models and {len(checkpoints)} "
              f"checkpoint(s){delete_finished_run(args)}" + (f"; continuing from {checkpoint}" if args.resume else ""))
    if state.is_main_process:  # the settings a resumed run is checked against
        write_json(os.path.join(directory, "settings.json"), {**vars(args), "num_processes": state.num_processes})
    state.wait_for_everyone()
    return checkpoint if args.resume else None


def finished_run_files(directory: str) -> list:  # eval.json, and the model by the names save_pretrained gives it
    pattern = re.compile(r"eval\.json|(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)"
                         r"(\.index\.json)?")
    return sorted(name for name in os.listdir(directory) if pattern.fullmatch(name))


def delete_finished_run(args) -> str:
    """A finished run's eval.json and saved models, except what a setting of this run loads from (named)."""
    sources = [os.path.realpath(value) for name, value in vars(args).items()
               if name != "output_dir" and isinstance(value, str) and value and os.path.exists(value)]
    kept = []
    for name in [*finished_run_files(args.output_dir), "value_model", "merged"]:
        path = os.path.realpath(os.path.join(args.output_dir, name))
        if name != "eval.json" and any(path == source or (os.path.isfile(path) and os.path.dirname(path) == source)
                                       or source.startswith(path + os.sep) for source in sources):
            kept.append(name)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return f" (kept {', '.join(kept)}: this run loads from there)" if kept else ""


def check_resume_settings(args, checkpoint: str):
    """Each of RESUME_MUST_MATCH as the run that wrote `checkpoint` had it (its output dir's settings.json)."""
    path = os.path.join(os.path.dirname(os.path.normpath(checkpoint)), "settings.json")
    saved = json.loads(pathlib.Path(path).read_text()) if os.path.exists(path) else {}
    now = {**vars(args), "num_processes": PartialState().num_processes}  # each process takes its own batch

    def comparable(settings: dict, name: str):  # the tiny preset's paths lie in its assets dir, wherever that is
        value, assets = settings[name], settings.get("tiny_assets_dir")
        return value.replace(assets, "{tiny}") if isinstance(value, str) and assets else value

    if changed := [f"--{name} {saved[name]} -> {now[name]}" for name in (*RESUME_MUST_MATCH, "num_processes")
                   if name in saved and comparable(saved, name) != comparable(now, name)]:
        fail(f"--resume {checkpoint!r}: the run that wrote it was trained with other settings ({'; '.join(changed)}), "
             f"and a resumed run ends where that run would only with the same ones. Nothing was loaded. Set them "
             f"back, or start a new run in another --output_dir.")


def write_json(path: str, data: dict):  # through a temporary file: a crash never leaves half of one
    with open(path + ".tmp", "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(path + ".tmp", path)


def save_atomically(directory: str, save, what: str, everyone: bool = True):
    """`save(staging)` on every process (or on this one alone), then what it wrote moved into `directory`, each
    replacing its namesake: a crash while saving never leaves files that look complete. A write that fails on any
    process (a full disk, or any OSError): what it wrote is removed, one paragraph, every process exits with 1."""
    state, staging = PartialState(), os.path.join(directory, ".saving")
    sync = state.wait_for_everyone if everyone else lambda: None
    if state.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # an earlier crash's
        os.makedirs(staging)
    sync()
    try:
        save(staging)
        error = None
    except Exception as err:  # on a full disk, torch's zip writer and safetensors raise their own types
        full = getattr(err, "errno", 0) == errno.ENOSPC or re.search("unexpected pos|No space|write failed", str(err))
        if not full and not isinstance(err, OSError):
            raise
        error = error_summary(err) + (". The disk is full" if full else "")
    errors = [e for e in (gather_object([error]) if everyone and state.num_processes > 1 else [error]) if e]
    if errors and not state.is_main_process:
        raise SystemExit(1)  # the main process says why
    if errors:
        shutil.rmtree(staging, ignore_errors=True)
        latest, trained = get_last_checkpoint(directory), finished_run_files(directory)
        then = resume_command(latest) if latest and not trained else ""
        kept = "the trained model" if trained else f"checkpoints up to {os.path.basename(latest)}" if latest else "none"
        fail(f"Could not save {what} in {directory!r}: {errors[0]} ({shutil.disk_usage(directory).free / 2**20:.0f} "
             f"MiB free there). The half-written files are removed; what was saved before is kept ({kept}). "
             f"Free some space, then " + ("continue with:" if then else "run again."), then)
    if state.is_main_process:
        for name in os.listdir(staging):
            target = os.path.join(directory, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
    sync()


class StopRequest:
    """Ctrl-C or SIGTERM, as a context manager around a run. While training, the first finishes the current step,
    saves a checkpoint and exits with 130 or 143; a second stops at once. While the trained model is being saved,
    the first lets the save finish. Otherwise one stops at once. Never with a traceback."""

    LEFT = {"setup": "Nothing was trained yet.",
            "training": "This step's checkpoint was not saved; earlier checkpoints are kept.",
            "saving": "The trained model was not saved (nothing half-written looks saved); continue with --resume.",
            "evaluation": "The trained model is saved in --output_dir; the evaluation (eval.json) was not written.",
            "reporting": "The trained model and eval.json are saved; what came after them may be incomplete."}
    FINISHING = {"training": "finishing the current step, then saving a checkpoint",
                 "saving": "finishing saving the trained model, then stopping"}

    def __init__(self):
        self.signal_name, self.phase, self.previous, self.since = None, "setup", {}, 0.0

    def __enter__(self) -> "StopRequest":
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase in self.FINISHING and not self.signal_name:
            self.signal_name, self.since = name, time.monotonic()
            self.say(f"\n{name}: {self.FINISHING[self.phase]} (again to stop at once).")
            return
        if "TORCHELASTIC_RUN_ID" in os.environ and time.monotonic() - self.since < 1:
            return  # torch's launcher passes the terminal's Ctrl-C on to its processes: the same one, twice
        self.signal_name = self.signal_name or name
        self.stop_now(f"\n{name}: stopped at once. {self.LEFT[self.phase]}")

    def requested(self, accelerator) -> bool:
        """Whether any process was asked to stop, the same answer on every process: all stop at the same step (a
        launcher signals them one by one, and a signal may land on one process after the others have answered)."""
        if self.signal_name:
            accelerator.set_trigger()
        stopping = accelerator.check_trigger()
        if stopping and not self.signal_name:
            self.signal_name = "SIGTERM"
        return stopping

    def enter(self, phase: str):  # a stop asked for while saving takes effect once the model is saved
        self.phase = phase
        if phase == "evaluation" and self.signal_name:
            self.stop_now(f"\nStopped by {self.signal_name}. {self.LEFT[phase]}")

    def say(self, message: str):  # of several processes, the main one alone
        if os.environ.get("RANK", "0") == "0":
            print(message, file=sys.stderr, flush=True)

    def stop_now(self, message: str):
        self.say(message)
        self.__exit__()
        raise SystemExit(128 + getattr(signal, self.signal_name))  # 130 Ctrl-C, 143 SIGTERM: the shell's convention

    def exit_after_checkpoint(self, when: str, checkpoint: str):
        how = f"set resume = {checkpoint!r} in Args and run again" if "ipykernel" in sys.modules else \
            f"  {resume_command(checkpoint)}"
        self.stop_now(f"\nStopped by {self.signal_name} {when}; checkpoint saved in {checkpoint}.\nResume with:\n{how}")


def resume_command(checkpoint: str, argv: Optional[list] = None) -> str:
    """This run's command line, launched the same way (as many processes), resuming from `checkpoint`: without its
    own --resume (bare, with a value or =PATH) and --overwrite_output_dir, which would delete the checkpoints."""
    argv, dropped = list(sys.argv[1:] if argv is None else argv), ("--resume", "--overwrite_output_dir")
    kept = [token for i, token in enumerate(argv) if token.split("=", 1)[0] not in dropped
            and not (i and argv[i - 1] in dropped and not token.startswith("--"))]
    processes = os.environ.get("WORLD_SIZE", "1")  # set by accelerate launch and torchrun, with their options:
    launcher = ["python"] if processes == "1" else ["torchrun", "--nproc_per_node", processes]
    if processes != "1" and "ACCELERATE_MIXED_PRECISION" in os.environ:
        launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", processes, "--mixed_precision",
                    os.environ["ACCELERATE_MIXED_PRECISION"]]
    note = "" if processes == "1" else f"\n  (it ran on {processes} processes: add any other launcher option it had)"
    return shlex.join([*launcher, SCRIPT, *kept, "--resume", checkpoint]) + note


def prepare_tracking(args):
    """wandb's project and entity; without credentials (WANDB_API_KEY, ~/.netrc) it logs offline, and says so."""
    if args.report_to != "wandb":
        return
    os.environ["WANDB_PROJECT"] = args.wandb_project  # read by transformers' wandb callback
    os.environ.update({"WANDB_ENTITY": args.wandb_entity} if args.wandb_entity else {})
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY") and not logged_in:
        os.environ["WANDB_MODE"] = "offline"
        PartialState().print("wandb: no credentials: logging offline to ./wandb (`wandb login`, then "
                             "`wandb sync ./wandb/offline-run-*` uploads it).")


def log_evaluation(args, summary: dict, table: str, rows: list, columns: list):
    """The final evaluation on wandb, when a run is open, which it then closes: summary values and one table."""
    wandb = sys.modules.get("wandb") if args.report_to == "wandb" else None  # imported by transformers' callback
    if wandb is not None and wandb.run is not None:
        wandb.run.summary.update(summary)
        wandb.run.log({table: wandb.Table(columns=columns, data=rows)})
        wandb.run.finish()  # flush and close the run: the evaluation is the last thing it records


def on_gpu(args) -> bool:
    return args.device != "cpu" and torch.cuda.is_available()
# </shared plumbing>


# %% Appendix D: tiny offline preset: small models and data built here, saved to disk, and loaded back through the
# same code as a real run's.
import random

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
    from datasets import Dataset
    from transformers import DistilBertConfig, GPT2Config

    print(f"Building the tiny preset's models and data in {directory} (once; under a minute) ...", flush=True)
    started = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    splits = {name: [(synthetic_review(rng, label), label) for label in [0, 1] * (n // 2)]
              for name, n in (("train", 2000), ("test", 400))}
    for name, rows in splits.items():
        Dataset.from_list([{"text": text, "label": label} for text, label in rows]).to_json(
            os.path.join(directory, "reviews", f"{name}.jsonl"))
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
    write_json(marker, {"built_in_seconds": round(time.time() - started, 1)})
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
    """DistilBERT's own tokenizer class (lower-cased WordPiece, [CLS] ... [SEP]) over every word of `texts` plus every
    character alone and as a "##" continuation, so any word made of known characters (policies invent some) is split
    into pieces. The vocabulary is listed here, not learnt by tokenizers' WordPiece trainer, whose ties break
    differently in every build (measured: 5 different vocabularies in 5 builds): the tiny rewards would differ."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import DistilBertTokenizer

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))})
    characters = sorted({character for word in words for character in word})
    pieces = dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *characters,
                            *["##" + character for character in characters]])  # ordered, no repeats
    return DistilBertTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, model_max_length=128)


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
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# %% Run: from the command line, or "Run all" in a notebook (which uses the constants as edited in Args)
if __name__ == "__main__":
    main(parse_args())
