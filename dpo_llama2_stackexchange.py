"""DPO fine-tunes Llama 2 7B, loaded in 4-bit NF4 with LoRA adapters, on Stack Exchange answer preferences.

Each pair is a question from lvwerra/stack-exchange-paired with a preferred answer (response_j) and a less
preferred one (response_k). TRL's DPOTrainer trains LoRA adapters on the 4-bit base; the reference policy is the
same base with the adapters switched off, so only one copy of the 7B weights is ever in memory.

    python dpo_llama2_stackexchange.py --preset tiny --output_dir outputs/dpo_tiny   # offline, CPU, ~1 minute
    python dpo_llama2_stackexchange.py                                               # the real run (GPU, HF token)
    python dpo_llama2_stackexchange.py --model_name_or_path path/to/sft_checkpoint --beta 0.2

The constants in `Args` are the interface: edit them, or override any with `--name value` or a YAML file. A preset
changes only defaults and prints what it changed. The file is also a notebook (`# %%` cells, percent format): open
it in VS Code, PyCharm or Jupyter (`jupytext --to notebook dpo_llama2_stackexchange.py`); "Run all" trains with the
constants as edited here. Read down to the first appendix for the whole recipe; the appendices are machinery.
"""

# %% Imports (each appendix imports what only it needs)
import signal
import sys

if __name__ == "__main__" and "ipykernel" not in sys.modules:  # Ctrl-C while the libraries load: no traceback
    def stopped_while_loading(signum, frame):
        print("\nSIGINT: stopped at once. Nothing was trained yet.", file=sys.stderr)
        raise SystemExit(130)  # as after training begins (Appendix C)

    signal.signal(signal.SIGINT, stopped_while_loading)

import gc
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # CPU kernels notice (bitsandbytes#2064)
warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|generation_config).*", category=FutureWarning)

import torch
from accelerate import PartialState
from datasets import load_dataset
from datasets.utils.logging import disable_progress_bar
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
from transformers.utils import logging as transformers_logging
from trl import DPOConfig

disable_progress_bar()  # datasets' per-map bars; the script says in one line what each step kept
transformers_logging.set_verbosity_error()  # load reports and deprecation notices; errors still show
transformers_logging.disable_progress_bar()  # weight-loading bars (training's own bar is on: disable_tqdm)
SCRIPT = "dpo_llama2_stackexchange.py"


def arg(default, help):
    """A dataclass field whose help text shows in `--help`."""
    return field(default=default, metadata={"help": help})


# %% Settings: the constants of a run. Defaults follow TRL's stack_llama_2 DPO recipe.
@dataclass
class Args:
    preset: Optional[str] = arg(None, "'tiny': build a tiny local Llama and preference set and run offline on a CPU")
    seed: int = arg(0, "seed for sampling, LoRA initialisation and data order: a run is reproducible from it")
    output_dir: str = arg("outputs/dpo_llama2_stackexchange", "where the adapter, tokenizer and eval.json go")

    # Model
    model_name_or_path: str = arg("meta-llama/Llama-2-7b-hf", "base model (hub id or local dir), or an SFT checkpoint")
    load_in_4bit: bool = arg(True, "load the base in 4-bit NF4 with double quantisation (bitsandbytes)")
    lora_r: int = arg(8, "LoRA rank")
    lora_alpha: int = arg(16, "LoRA scaling numerator")
    lora_dropout: float = arg(0.05, "dropout on the LoRA path")
    lora_target_modules: str = arg("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                   "comma-separated modules that get adapters: all of Llama's attention and MLP")
    gradient_checkpointing: bool = arg(True, "recompute activations in backward: far less memory, ~30% slower")
    upcast_non_quantized: bool = arg(False, "fp32 copies of embeddings, norms, lm_head (peft's kbit preparation). "
                                     "Off: bf16 on a GPU, 1.28x faster steps on an H200; no effect on a CPU")

    # Data
    dataset_name: str = arg("lvwerra/stack-exchange-paired", "preference dataset: hub id or local directory")
    train_data_dir: str = arg("data/rl", "data_dir of the training pairs")
    eval_data_dir: str = arg("data/evaluation", "data_dir of the held-out pairs")
    max_train_samples: Optional[int] = arg(None, "cap on training pairs read (before filtering); None: all")
    max_eval_samples: int = arg(1000, "cap on held-out pairs read (before filtering)")
    max_prompt_length: int = arg(512, "drop pairs whose prompt is longer than this many tokens")
    max_length: int = arg(1024, "drop pairs whose prompt + answer (+ EOS) is longer than this many tokens")
    dataset_num_proc: Optional[int] = arg(None, "processes for dataset mapping; None: one")

    # Algorithm: DPO
    beta: float = arg(0.1, "DPO temperature: how far the policy may move from the reference")
    learning_rate: float = arg(5e-4, "peak learning rate of the LoRA weights")
    lr_scheduler_type: str = arg("cosine", "learning rate schedule after warmup")
    warmup_steps: int = arg(100, "linear warmup steps")
    weight_decay: float = arg(0.05, "AdamW weight decay")
    optim: str = arg("paged_adamw_32bit", "optimizer (paged AdamW moves optimizer state to CPU under memory pressure)")
    per_device_train_batch_size: int = arg(4, "pairs per device per forward pass")
    per_device_eval_batch_size: int = arg(1, "pairs per device per evaluation forward pass")
    gradient_accumulation_steps: int = arg(4, "forward passes per optimizer step")
    max_steps: int = arg(1000, "optimizer steps to train")

    # Evaluation
    num_eval_generations: int = arg(3, "held-out questions answered by the base and the trained model")
    max_new_tokens: int = arg(128, "length of those generated answers")

    # Tracking and saving
    report_to: str = arg("wandb", "wandb, tensorboard or none (wandb without credentials logs offline to ./wandb)")
    wandb_project: str = arg("dpo_llama2_stackexchange", "wandb project the run is logged to")
    wandb_entity: Optional[str] = arg(None, "wandb team or user; None: your default entity")
    run_name: Optional[str] = arg(None, "run name on the tracker; None: generated")
    logging_steps: int = arg(10, "log metrics every N steps")
    eval_steps: int = arg(100, "evaluate on the held-out pairs every N steps; 0: never during training")
    save_steps: int = arg(100, "save a checkpoint every N steps; 0: no periodic checkpoints")
    resume: Optional[str] = arg(None, "continue from a checkpoint: 'latest' (bare --resume) or a checkpoint dir")
    overwrite_output_dir: bool = arg(False, "start over in an output dir that holds a finished or unfinished run "
                                     "(its eval.json, saved models and checkpoints are deleted)")
    merge_full_model: bool = arg(False, "also save the base with the adapter merged in (reloads the base unquantised)")
    push_to_hub: bool = arg(False, "push the adapter and tokenizer to the hub")
    hub_model_id: Optional[str] = arg(None, "hub repo for push_to_hub; None: the output dir's name")

    # System and speed
    device: str = arg("auto", "auto (CUDA when present), cuda or cpu")
    tf32: bool = arg(True, "on an Ampere or newer GPU, run fp32 matmuls on TF32 tensor cores")
    use_liger_kernel: Optional[bool] = arg(None, "Liger's fused DPO loss and kernels (H200: 1.25x faster, 1.7 GiB "
                                           "less). None: on where a GPU and `pip install liger-kernel` are present")
    group_by_length: bool = arg(False, "each optimizer step's pairs of similar token length (random groups of up to "
                                "50 steps' pairs, sorted): fewer pad tokens on real pairs. Not yet measured on a GPU")
    tiny_assets_dir: Optional[str] = arg(None, "with --preset tiny: where the tiny model and data are built")


# A preset changes only defaults (explicit flags and YAML win) and prints what it changed. "{tiny}" stands for the
# directory the tiny assets are built in.
PRESETS = {
    "tiny": dict(model_name_or_path="{tiny}/llama", dataset_name="{tiny}/stack-exchange-paired", max_eval_samples=64,
                 max_prompt_length=48, max_length=96, learning_rate=2e-3, warmup_steps=10,
                 optim="adamw_torch",  # paged optimizers need CUDA
                 per_device_train_batch_size=16, per_device_eval_batch_size=16, gradient_accumulation_steps=1,
                 max_steps=150, logging_steps=10, eval_steps=50, save_steps=0, max_new_tokens=24, beta=0.5),
}
# A run without a GPU changes these settings as a preset does, where they hold the GPU value (first), to the second
# (none here: the defaults' GPU-only settings are refused on a CPU with what to change).
WITHOUT_A_GPU: dict = {}


# %% 1. Data: Stack Exchange pairs -> prompt / chosen / rejected, filtered by token length.
REQUIRED_COLUMNS = ("question", "response_j", "response_k")


def make_pair(question: str, chosen: str, rejected: str) -> dict:
    """The recipe's text, "Question: {q}\\n\\nAnswer: {answer}", split so the prompt's tokens are a true prefix.

    Llama's tokenizer merges the space before a word into that word ("▁Hello"). A prompt ending in "Answer: "
    therefore tokenizes alone with a stray "▁" that prompt+answer does not have, and TRL 1.12 then silently cuts
    the first word off every answer. Moving the space from the prompt's end to each answer's start keeps the
    full text identical and the prompt a prefix."""
    prompt = "Question: " + question + "\n\nAnswer: "
    stem = prompt.rstrip(" ")
    moved = prompt[len(stem) :]
    return {"prompt": stem, "chosen": moved + chosen, "rejected": moved + rejected}


def unusable(question, chosen, rejected) -> str:
    """Why a pair cannot teach a preference ("" when it can)."""
    if not all(isinstance(text, str) for text in (question, chosen, rejected)):
        return "missing"  # a question or an answer is absent (None)
    if not chosen.strip() or not rejected.strip():
        return "empty"
    return "identical" if chosen.strip() == rejected.strip() else ""


def load_pairs(args: Args, tokenizer, data_dir: str, cap: Optional[int], setting: str):
    """Read one data_dir, drop pairs that cannot teach a preference or exceed the token limits (counted per reason,
    in one line), and map the rest to prompt/chosen/rejected."""
    dataset = load_or_explain(lambda name: load_dataset(name, data_dir=data_dir, split="train"),
                              args.dataset_name, "dataset_name", related=setting)
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        fail(f"'{args.dataset_name}' ({data_dir}) lacks the column(s) {', '.join(missing)} (it has: "
             f"{', '.join(dataset.column_names)}). The script needs question, response_j (preferred) and "
             f"response_k (rejected): set --dataset_name to a dataset in that format.")
    if cap is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(cap, len(dataset))))
    read = len(dataset)
    reasons = [unusable(*row) for row in zip(*(dataset[column] for column in REQUIRED_COLUMNS))]
    dataset = dataset.select([i for i, reason in enumerate(reasons) if not reason])
    dataset = dataset.map(lambda row: make_pair(row["question"], row["response_j"], row["response_k"]),
                          remove_columns=dataset.column_names, num_proc=args.dataset_num_proc)

    def count_tokens(batch):
        # Counted in tokens, as the trainer will see them (EOS included): characters say little about length.
        prompt = tokenizer(batch["prompt"])["input_ids"]
        chosen = tokenizer([p + c for p, c in zip(batch["prompt"], batch["chosen"])])["input_ids"]
        rejected = tokenizer([p + r for p, r in zip(batch["prompt"], batch["rejected"])])["input_ids"]
        return {"prompt_tokens": [len(ids) for ids in prompt],
                "total_tokens": [max(len(c), len(r)) + 1 for c, r in zip(chosen, rejected)]}

    usable = len(dataset)
    dataset = dataset.map(count_tokens, batched=True, num_proc=args.dataset_num_proc)
    dataset = dataset.filter(lambda prompt, total: prompt <= args.max_prompt_length and total <= args.max_length,
                             input_columns=["prompt_tokens", "total_tokens"], num_proc=args.dataset_num_proc)
    counts = Counter(reasons)
    PartialState().print(
        f"{data_dir}: kept {len(dataset)} of {read} pairs; dropped {counts['missing']} with a missing question or "
        f"answer, {counts['empty']} with an empty answer, {counts['identical']} with identical answers, "
        f"{usable - len(dataset)} over --max_prompt_length {args.max_prompt_length} or --max_length "
        f"{args.max_length} tokens")
    if usable == 0:
        fail(f"No pair in '{args.dataset_name}' ({data_dir}) can teach a preference: of {read} read, "
             f"{counts['missing']} miss a question or answer, {counts['empty']} have an empty answer and "
             f"{counts['identical']} identical answers. Check the data's columns ({', '.join(REQUIRED_COLUMNS)}).")
    if len(dataset) == 0:
        fail(f"No usable pair in '{args.dataset_name}' ({data_dir}) fits --max_prompt_length {args.max_prompt_length} "
             f"and --max_length {args.max_length} tokens. Raise those limits, or read more pairs.")
    # Each pair's padded length (prompt + the longer answer + EOS), for --group_by_length.
    return dataset.remove_columns(["prompt_tokens"]).rename_column("total_tokens", "pair_tokens")


# %% 2. Model: one 4-bit base with LoRA adapters; the reference is that base with the adapters disabled.
def load_tokenizer(args: Args):
    tokenizer = load_checked_tokenizer(args.model_name_or_path, "model_name_or_path")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama 2 has none; DPO masks padding by length, not by id
    return tokenizer


def compute_dtype(args: Args) -> torch.dtype:
    # bf16 on GPUs that have it. On a CPU, fp32: a bf16 model there computes the DPO loss in bf16.
    return torch.bfloat16 if on_gpu(args) and torch.cuda.is_bf16_supported() else torch.float32


def quantization_config(args: Args) -> Optional[BitsAndBytesConfig]:
    """NF4 with double quantisation. (The anchor's bare load_in_4bit=True meant fp4 with fp32 compute.)"""
    if not args.load_in_4bit:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(args))


def load_model(args: Args):
    config = load_or_explain(AutoConfig.from_pretrained, args.model_name_or_path, "model_name_or_path")
    context = getattr(config, "max_position_embeddings", None)
    if context and args.max_length > context:  # read from the config, before any weights are loaded
        fail(f"--max_length ({args.max_length}) exceeds the model's context of {context} tokens. Lower --max_length.")
    device = PartialState().local_process_index if on_gpu(args) else "cpu"  # each process its own GPU
    model = load_or_explain(
        lambda name: AutoModelForCausalLM.from_pretrained(
            name, quantization_config=quantization_config(args), dtype=compute_dtype(args), device_map={"": device}),
        args.model_name_or_path, "model_name_or_path")
    model.config.use_cache = False  # incompatible with gradient checkpointing during training
    return prepare_4bit_for_training(model, args) if args.load_in_4bit else model


def lora_config(args: Args, model) -> LoraConfig:
    """LoRA on every attention and MLP projection. (The anchor listed targets of which only q/k/v exist in Llama.)"""
    targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    check_lora_targets(targets, model)
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


# %% 3. Trainer: TRL's DPO configuration from the constants above.
def build_dpo_config(args: Args) -> DPOConfig:
    gpu = on_gpu(args)
    return DPOConfig(
        output_dir=args.output_dir, seed=args.seed, beta=args.beta, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,  # the anchor declared 0.05 and never passed it
        optim=args.optim, per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_checkpointing=args.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,  # every adapter trains every step: no per-step search (and its warning)
        max_length=args.max_length, max_steps=args.max_steps, logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        report_to=args.report_to, run_name=args.run_name,
        disable_tqdm=False,  # a progress bar with the step count and time left (quiet library logs would hide it)
        dataset_num_proc=args.dataset_num_proc,  # the anchor read an undefined num_proc
        use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(),  # TrainingArguments refuses bf16 on CPU
        tf32=tf32_setting(args), use_liger_kernel=use_liger(args),
    )


# %% 4. Train: the recipe in order. main() runs every stage; 5 and 6 are the functions below it.
def main(args: Args) -> dict:
    """Train and evaluate as `args` says; returns what eval.json holds."""
    started = time.time()
    # 0. Before anything is loaded: refuse settings that cannot work, protect finished runs, seed, pick the tracker.
    validate(args)
    with StopRequest() as stop:  # Ctrl-C or SIGTERM, from here to the end: see Appendix C
        PartialState(cpu=not on_gpu(args))  # the first PartialState fixes the process group: CPU without a GPU
        check_hub_reachable(args, ["model_name_or_path", "dataset_name"])
        checkpoint = prepare_output_dir(args, checkpoint_marker="trainer_state.json")
        if args.preset == "tiny":
            with PartialState().main_process_first():  # after the refusals; one process builds, others reuse
                build_tiny_assets(args.tiny_assets_dir)
        set_seed(args.seed)
        prepare_tracking(args)
        say = PartialState().print  # progress lines from the main process only

        # 1. Data
        tokenizer = load_tokenizer(args)
        with PartialState().main_process_first():  # one process fills the datasets cache, the others read it
            train_pairs = load_pairs(args, tokenizer, args.train_data_dir, args.max_train_samples, "train_data_dir")
            eval_pairs = load_pairs(args, tokenizer, args.eval_data_dir, args.max_eval_samples, "eval_data_dir")
        check_enough_pairs(args, len(train_pairs))

        # 2. Model: 4-bit base; LoRA is added by the trainer from this config
        model = load_model(args)
        peft_config = lora_config(args, model)

        # 3. Trainer (reference = the same base with the adapters disabled: ref_model=None with a peft_config)
        trainer = QLoRADPOTrainer(
            model=model, ref_model=None, args=build_dpo_config(args), train_dataset=train_pairs,
            eval_dataset=eval_pairs if args.eval_steps > 0 else None, processing_class=tokenizer,
            peft_config=peft_config, callbacks=[StopOnSignal(stop)], adapter_dtype=compute_dtype(args),
            group_by_length=args.group_by_length)

        # 4. Train, then save the adapter at once: nothing trained is lost if anything later fails
        say(f"Training: {args.max_steps} DPO steps on {trainer.accelerator.num_processes} x {trainer.accelerator.device}"
            + (f", resuming from {checkpoint}" if checkpoint else ""))
        stop.enter("training")
        train_started = time.time()
        trainer.train(resume_from_checkpoint=checkpoint)
        train_seconds, steps = time.time() - train_started, trainer.state.global_step
        steps_this_run = steps - (read_json(os.path.join(checkpoint, "trainer_state.json"))["global_step"]
                                  if checkpoint else 0)
        stopped_at = os.path.join(args.output_dir, f"checkpoint-{steps}")
        if stop.signal_name and os.path.isdir(stopped_at):  # else training had ended: the adapter is saved next
            stop.exit_after_checkpoint(f"after step {steps} of {args.max_steps}", stopped_at)
        peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
        stop.enter("saving")
        save_outputs(trainer, tokenizer, args)
        stop.enter("evaluation")

        # 5. Evaluate the base (adapters off) and the trained model on the same held-out pairs
        say(f"Evaluating the base and the trained model on {len(eval_pairs)} held-out pairs ...")
        with trainer.model.disable_adapter():
            base_result, base_logratios = evaluate(trainer.model, tokenizer, eval_pairs, args)
        trained_result, _ = evaluate(trainer.model, tokenizer, eval_pairs, args, base_logratios)

        # 6. Report: eval.json, the table, the tracker's summary; then the upload and the merged model if asked for
        train_log = [{key: entry[key] for key in ("step", "loss", "grad_norm", "num_tokens", "pad_fraction")
                      if key in entry}
                     for entry in trainer.state.log_history if "loss" in entry]
        result = {"base": base_result, "trained": trained_result, "args": asdict(args),
                  "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 2),
                  "steps": steps, "steps_this_run": steps_this_run,
                  "seconds_per_step": round(train_seconds / max(steps_this_run, 1), 4),
                  "peak_gpu_memory_gib": peak_gib, "train_log": train_log,  # step 1's loss is ln 2 = 0.6931
                  "train_tokens": trainer._total_train_tokens,  # non-pad tokens of chosen and rejected, this run
                  "pad_fraction": trainer.pad_fraction(),  # of the positions the training batches held, this run
                  "written_by_process": PartialState().process_index}
        if PartialState().is_main_process:
            write_json(os.path.join(args.output_dir, "eval.json"), result)
            stop.enter("reporting")
            report(base_result, trained_result, wandb_run_if_open(args))
            print(f"Saved the LoRA adapter, tokenizer and eval.json to {args.output_dir} ({result['seconds']}s)")
            upload_failed = push_to_hub(trainer.model, tokenizer, args) if args.push_to_hub else None
            if args.merge_full_model:
                del trainer, model  # free the 4-bit base before loading an unquantised one
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                merge_full_model(args, tokenizer)
            if upload_failed:  # after the merge: a failed upload costs nothing else the run was asked for
                fail(upload_failed)
    return result


# %% 5. Evaluate: preference accuracy and margin on held-out pairs, plus a few generated answers.
@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int) -> torch.Tensor:
    """Sum of log p(completion + EOS | prompt), tokenized the way DPOTrainer tokenizes pairs."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            rows.append(tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id])
            starts.append(len(tokenizer(prompt)["input_ids"]))
        width = max(map(len, rows))
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        positions = torch.arange(width - 1, device=device)[None]
        completion_mask = (positions >= torch.tensor(starts, device=device)[:, None] - 1) & (mask[:, 1:] == 1)
        results.append((token_logps * completion_mask).sum(-1).cpu())
    return torch.cat(results)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    answers = []
    for prompt in prompts:
        batch = tokenizer(prompt, return_tensors="pt").to(device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def evaluate(model, tokenizer, pairs, args: Args, base_logratios: Optional[torch.Tensor] = None):
    """Preference of `model` on held-out pairs: accuracy = share of pairs where the chosen answer is more likely
    than the rejected one, margin = beta * mean log-likelihood gap. Against the base, also DPO's implicit reward.
    Returns the result and the per-pair log-likelihood gaps (the base's are the reference for the trained model)."""
    was_training = model.training
    model.eval()
    prompts = list(pairs["prompt"])
    chosen = completion_logps(model, tokenizer, prompts, list(pairs["chosen"]), args.per_device_eval_batch_size)
    rejected = completion_logps(model, tokenizer, prompts, list(pairs["rejected"]), args.per_device_eval_batch_size)
    logratios = chosen - rejected
    result = {"accuracy": (logratios > 0).float().mean().item(), "margin": args.beta * logratios.mean().item(),
              "num_pairs": len(prompts)}
    if base_logratios is not None:  # DPO's implicit reward: beta * (log-ratio of the policy - that of the reference)
        implicit = args.beta * (logratios - base_logratios)
        result.update(implicit_reward_accuracy=(implicit > 0).float().mean().item(),
                      implicit_reward_margin=implicit.mean().item())
    questions = prompts[: args.num_eval_generations]
    result["generations"] = [{"prompt": q, "answer": a} for q, a in
                             zip(questions, generate_answers(model, tokenizer, questions, args.max_new_tokens))]
    model.train(was_training)
    return result, logratios


# %% 6. Report: the before/after table, eval.json and the tracker's summary.
def report(base: dict, trained: dict, wandb_run=None):
    print("\n=== Held-out preference evaluation ===================================")
    print(f"{'':8} {'accuracy':>9} {'margin':>9} {'implicit reward acc':>20} {'implicit margin':>16}")
    print(f"{'base':8} {base['accuracy']:9.3f} {base['margin']:9.3f}")
    print(f"{'trained':8} {trained['accuracy']:9.3f} {trained['margin']:9.3f} "
          f"{trained['implicit_reward_accuracy']:20.3f} {trained['implicit_reward_margin']:16.3f}")
    for before, after in zip(base["generations"], trained["generations"]):
        print(f"\n{before['prompt']}")
        print(f"  base:    {before['answer']!r}")
        print(f"  trained: {after['answer']!r}")
    print("=======================================================================\n")
    summary = {f"eval/{name}/{key}": value for name, result in (("base", base), ("trained", trained))
               for key, value in result.items() if isinstance(value, float)}
    rows = [[b["prompt"], b["answer"], t["answer"]] for b, t in zip(base["generations"], trained["generations"])]
    log_evaluation(wandb_run, summary, "eval/generations", rows, ["question", "base", "trained"])


# %% Appendix A: TRL 1.12, peft and bitsandbytes workarounds. Where this script touches them, and why:
# - DPOTrainer's LoRA dtype: TRL casts the adapters of any 4-bit model to bf16 and reloads checkpoints in fp32
#   (QLoRADPOTrainer.cast_adapters, _load_from_checkpoint)
# - Trainer._save_checkpoint: checkpoints are written under a temporary name and renamed when complete
# - callbacks: a stop on Ctrl-C/SIGTERM after the current step (StopOnSignal)
# - bitsandbytes' CPU repack of 4-bit weights, which breaks LoRA gradients (guard_cpu_4bit_gradients)
# - use_liger_kernel: TRL's fused linear DPO loss, where a GPU and liger-kernel are present
# - Trainer._get_train_sampler: pairs grouped by length with --group_by_length (LengthGroupedPairs); compute_loss
#   counts padded positions for the pad_fraction metric
# - peft's prepare_model_for_kbit_training: used only with --upcast_non_quantized (prepare_4bit_for_training)
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices
from trl import DPOTrainer


class QLoRADPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, with the LoRA weights kept in one dtype, checkpoints that never look complete before
    they are, and a progress bar that a resumed run begins at its step. TRL 1.12 casts the adapters to bf16 for any
    4-bit model (even on a CPU that computes in fp32), while resuming reloads them in fp32: a resumed run would
    continue in another precision than the run it resumes. Here they stay in the compute dtype: bf16 on GPU, fp32
    on CPU."""

    def __init__(self, *args, adapter_dtype: torch.dtype, group_by_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_dtype, self.group_by_length = adapter_dtype, group_by_length
        self.length_sampler: Optional[LengthGroupedPairs] = None  # with --group_by_length
        self.train_positions = 0  # positions of the training batches (pad included), this run
        self.window_tokens = self.window_positions = 0  # since the last training log line
        self.cast_adapters()
        show_progress_from_the_resumed_step(self)

    def cast_adapters(self):
        for param in self.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(self.adapter_dtype)

    def _load_from_checkpoint(self, *args, **kwargs):
        super()._load_from_checkpoint(*args, **kwargs)
        self.cast_adapters()  # before the optimizer is built from these parameters

    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        lengths = list(self.train_dataset["pair_tokens"])  # counted by load_pairs; same rows as `train_dataset`
        pairs_per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        self.length_sampler = LengthGroupedPairs(lengths, pairs_per_step, self.args.seed)
        return self.length_sampler

    def _run_epoch(self, model, epoch, *args, **kwargs):
        # accelerate passes the Trainer's set_epoch on through most wrappers, but not through the ones of several
        # processes resuming mid-epoch (a batch-skipping sampler around a sharding one around ours): the resumed run
        # would redraw epoch 0's order (test_the_length_sampler_gets_its_epoch_where_accelerate_does_not_pass_it_on).
        if self.length_sampler is not None:
            self.length_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        tokens_before = self._total_train_tokens  # TRL adds each training batch's non-pad tokens (all processes)
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if self.model.training:  # TRL's own test for counting tokens
            mask = inputs["attention_mask"]
            positions = self.accelerator.gather_for_metrics(torch.tensor([mask.numel()], device=mask.device))
            positions = positions.sum().item()
            self.train_positions += positions
            self.window_positions += positions
            self.window_tokens += self._total_train_tokens - tokens_before
        return result

    def log(self, logs: dict, *args, **kwargs):
        if self.model.training and self.window_positions:  # the share of padding in what was computed
            logs["pad_fraction"] = round(1 - self.window_tokens / self.window_positions, 4)
            self.window_tokens = self.window_positions = 0
        super().log(logs, *args, **kwargs)

    def pad_fraction(self) -> Optional[float]:
        """Share of the training batches' positions that were padding, this run."""
        return round(1 - self._total_train_tokens / self.train_positions, 4) if self.train_positions else None

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written into OUTPUT_DIR/.saving and renamed to checkpoint-N once complete."""
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(self.args.output_dir, ".saving")

        def save():
            self._get_output_dir = lambda trial=None: staging  # where the Trainer puts checkpoint-N
            try:
                super(QLoRADPOTrainer, self)._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir

        save_atomically(self.accelerator, os.path.join(staging, name), os.path.join(self.args.output_dir, name), save)


class LengthGroupedPairs(torch.utils.data.Sampler):
    """Training pairs in an order where each optimizer step's pairs have similar lengths, so that its batches carry
    little padding: transformers' length grouping (random groups of up to 50 steps' pairs, each sorted by length,
    the longest step first, so that memory runs out at once if it will). Drawn from (seed, epoch), which the
    Trainer sets each epoch: a resumed run skips to the same place in the same order. transformers' own
    length-grouped sampler draws from the global random state, which a resumed run does not restore to where the
    epoch began."""

    def __init__(self, lengths: list[int], pairs_per_step: int, seed: int):
        self.lengths, self.pairs_per_step, self.seed, self.epoch = lengths, pairs_per_step, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.pairs_per_step, generator=generator))


class StopOnSignal(TrainerCallback):
    """Turns a stop request into the Trainer's own save-and-stop at the end of the current step."""

    def __init__(self, stop: "StopRequest"):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.requested():
            control.should_save = True
            control.should_training_stop = True


def prepare_4bit_for_training(model, args: Args):
    """Freeze the 4-bit base and turn on gradient checkpointing. peft's prepare_model_for_kbit_training also keeps
    fp32 copies of the embeddings, norms and lm_head (--upcast_non_quantized): with them the whole residual stream
    runs in fp32 (the embedding's output is fp32), twice the bytes through every norm, residual add and LoRA input
    of every layer (H200, 16 pairs per step: 6.29 -> 4.90 s per step and 11.7 -> 9.0 GiB without them)."""
    if model.device.type == "cpu":
        guard_cpu_4bit_gradients(model)
    if args.upcast_non_quantized:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def guard_cpu_4bit_gradients(model):
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights on any eval-mode no-grad forward; a
    backward after that returns wrong LoRA gradients. Turning the repack off keeps gradients right (GPU: no-op)."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def use_liger(args: Args) -> bool:
    """--use_liger_kernel as given; unset: on where a GPU and the package are present."""
    return args.use_liger_kernel if args.use_liger_kernel is not None else on_gpu(args) and liger_installed()


def liger_installed() -> bool:
    from trl.import_utils import is_liger_kernel_available

    return is_liger_kernel_available()


def save_outputs(trainer, tokenizer, args: Args):
    """The LoRA adapter + tokenizer (PeftModel.from_pretrained(base, OUTPUT_DIR) loads them), written once."""
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
    trainer.accelerator.wait_for_everyone()


def merge_full_model(args: Args, tokenizer):
    """Merge the adapter into an unquantised copy of the base (merging into 4-bit weights would lose precision)."""
    dtype = torch.bfloat16 if on_gpu(args) and torch.cuda.is_bf16_supported() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, args.output_dir).merge_and_unload()
    merged.save_pretrained(os.path.join(args.output_dir, "merged"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
    print(f"Saved the merged model to {os.path.join(args.output_dir, 'merged')}")


# %% Appendix B: this script's settings checks: one paragraph naming the setting, before anything is loaded.
# Settings that shape training's course: a resumed run must use those its checkpoint's run used (settings.json in
# the output dir), or it would end where neither run would. The others (tracking, saving, speed) may change.
RESUME_MUST_MATCH = ("model_name_or_path", "load_in_4bit", "dataset_name", "train_data_dir", "seed", "learning_rate",
                     "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "max_steps", "beta", "lora_r", "lora_alpha", "lora_dropout",
                     "lora_target_modules", "max_prompt_length", "max_length", "max_train_samples", "group_by_length")


def validate(args: Args):
    positive = dict(
        max_prompt_length=args.max_prompt_length, max_length=args.max_length, max_steps=args.max_steps,
        learning_rate=args.learning_rate, beta=args.beta, per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        gradient_accumulation_steps=args.gradient_accumulation_steps, logging_steps=args.logging_steps,
        max_eval_samples=args.max_eval_samples,
        max_train_samples=1 if args.max_train_samples is None else args.max_train_samples,
    )
    for name, value in positive.items():
        if not value > 0:
            fail(f"--{name} must be positive, got {value}.")
    for name, value in dict(save_steps=args.save_steps, eval_steps=args.eval_steps, warmup_steps=args.warmup_steps,
                            weight_decay=args.weight_decay, num_eval_generations=args.num_eval_generations).items():
        if value < 0:
            fail(f"--{name} must be 0 or more, got {value}.")
    if not 0 <= args.lora_dropout < 1:
        fail(f"--lora_dropout must be at least 0 and below 1, got {args.lora_dropout}.")
    if not any(name.strip() for name in args.lora_target_modules.split(",")):
        fail(f"--lora_target_modules names no module (got {args.lora_target_modules!r}): give the comma-separated "
             f"names of the linear layers LoRA adapts, such as {Args.lora_target_modules}.")
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for name, value, choices in (("lr_scheduler_type", args.lr_scheduler_type, [s.value for s in SchedulerType]),
                                 ("optim", args.optim, [o.value for o in OptimizerNames])):
        if value not in choices:
            listed = ", ".join(choices) if len(choices) <= 15 else ", ".join(choices[:8]) + f" and {len(choices) - 8} more"
            fail(f"--{name} {value!r} is not one transformers knows{did_you_mean(value, choices)}. It takes: {listed}.")
    if args.max_prompt_length >= args.max_length:
        fail(f"--max_prompt_length ({args.max_prompt_length}) must be below --max_length ({args.max_length}): "
             f"the answer needs room.")
    validate_common(args)
    if args.use_liger_kernel and not on_gpu(args):
        fail("--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton GPU kernels). Drop it on a CPU.")
    if args.use_liger_kernel and not liger_installed():
        fail("--use_liger_kernel needs the liger-kernel package, which is not installed: "
             "`pip install liger-kernel==0.8.5`, or drop --use_liger_kernel.")
    if args.use_liger_kernel is None and on_gpu(args) and not liger_installed() and os.environ.get("RANK", "0") == "0":
        print("note: liger-kernel is not installed; with it (`pip install liger-kernel==0.8.5`) DPO steps run "
              "about 1.25x faster on this GPU in less memory.")
    if args.optim.startswith("paged_") and not on_gpu(args):
        fail(f"--optim {args.optim} needs a CUDA GPU. On a CPU use --optim adamw_torch.")
    if args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # a broken native library raises more than ImportError
            fail(f"--load_in_4bit needs bitsandbytes, which cannot run here ({type(err).__name__}: {err}). "
                 f"Install a bitsandbytes build for this machine, or pass --load_in_4bit false (needs far more memory).")


def check_lora_targets(targets: list, model):
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [name for name in targets if name not in present]
    if absent:
        fail(f"--lora_target_modules names {', '.join(absent)}, which this model does not have. Its linear layers "
             f"include: {', '.join(sorted(n for n in present if n.endswith('proj')))}.")


def check_enough_pairs(args: Args, pairs: int):
    """One optimizer step needs this many pairs; fewer would train on nothing useful without a word."""
    processes = PartialState().num_processes
    needed = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    if pairs < needed:
        fail(f"Only {pairs} training pairs remain after filtering, fewer than one optimizer step takes "
             f"(--per_device_train_batch_size {args.per_device_train_batch_size} x --gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps} x {processes} process(es) = {needed}). Lower those, or read more "
             f"pairs (--max_train_samples, --dataset_name).")


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


# %% Appendix D: tiny offline preset: a small Llama and preference set built here, saved to disk, and loaded
# back through the same code as a real run's.
TASKS = {"reverse a list": "the reversed function", "read a file line by line": "a file iterator",
         "sort a dictionary by value": "the sorted function with a key", "remove duplicates from a list": "a set",
         "parse a date string": "the standard date parser", "join two strings": "the concatenation operator",
         "count words in a text": "a counter", "convert a string to an integer": "the integer constructor",
         "merge two lists": "list concatenation", "find the largest number": "the max function"}
LANGUAGES = ["python", "javascript", "java", "ruby", "go", "rust"]
DETAILS = ["I tried a loop but it feels slow.", "My current code is ugly.", "I am new to programming.",
           "This is for a small script at work.", "", ""]
ANSWERS = ["You can use {tool} for this. It is short and fast, and it keeps your code readable.",
           "Use {tool}. Here is the idea: call it on your data and return the result.",
           "The usual way in {lang} is {tool}. It handles the edge cases for you."]


def synthetic_pairs(rng: random.Random, n: int, qid_start: int) -> list[dict]:
    """Made-up questions whose preferred answer names the right tool for the task and whose rejected answer, in
    the same words, names a wrong one: the base model (trained on both) has no preference; DPO must learn which
    tool goes with which task. A few overlong questions exercise the token filter."""
    rows = []
    for i in range(n):
        task, tool = rng.choice(list(TASKS.items()))
        wrong_tool = rng.choice([other for other in TASKS.values() if other != tool])
        lang = rng.choice(LANGUAGES)
        question = f"How do I {task} in {lang}? {rng.choice(DETAILS)}".strip()
        if rng.random() < 0.05:
            question += " Here is my code: " + " ".join(["x = x + 1;"] * 30)
        answer = rng.choice(ANSWERS)
        rows.append({"qid": qid_start + i, "question": question, "date": "2023/01/01",
                     "response_j": answer.format(tool=tool, lang=lang),
                     "response_k": answer.format(tool=wrong_tool, lang=lang)})
    return rows


def build_tiny_assets(directory: str, seed: int = 0):
    """Preference pairs in stack-exchange-paired's layout (data/rl, data/evaluation), a Llama-style tokenizer
    (SentencePiece-like BPE: '▁' marks spaces, byte fallback, BOS added) and a tiny Llama pretrained on the
    question/answer text so that it writes something readable. Skipped when already built."""
    marker = os.path.join(directory, "READY")
    if os.path.exists(marker):
        return
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    print(f"Building the tiny preset's models and data in {directory} (once; under a minute) ...", flush=True)
    started = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    splits = {"rl": synthetic_pairs(rng, 600, 0), "evaluation": synthetic_pairs(rng, 120, 10_000)}
    for data_dir, rows in splits.items():
        os.makedirs(os.path.join(directory, "stack-exchange-paired", "data", data_dir), exist_ok=True)
        with open(os.path.join(directory, "stack-exchange-paired", "data", data_dir, "train.jsonl"), "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    # Pretraining text pairs each question with a random tool, so the base learns the format but not which tool
    # fits which task: that is left for DPO to learn from the preferences.
    texts = []
    for row in splits["rl"]:
        lang = next(language for language in LANGUAGES if f" in {language}?" in row["question"])
        answer = rng.choice(ANSWERS).format(tool=rng.choice(list(TASKS.values())), lang=lang)
        texts.append(f"Question: {row['question']}\n\nAnswer: {answer}")

    sentencepiece_like = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sentencepiece_like.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sentencepiece_like.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    sentencepiece_like.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    sentencepiece_like.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *bytes_], initial_alphabet=["▁"], show_progress=False))
    sentencepiece_like.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", sentencepiece_like.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sentencepiece_like, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=128)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    encoded = [ids[:64] + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(200):  # a short "SFT" so that generations read like answers
        batch = random.Random(step).sample(encoded, 32)
        width = max(map(len, batch))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in batch])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(os.path.join(directory, "llama"))
    tokenizer.save_pretrained(os.path.join(directory, "llama"))
    with open(marker, "w") as handle:
        handle.write(f"built in {time.time() - started:.1f}s\n")
    print(f"Built a tiny Llama and preference set in {directory} ({time.time() - started:.1f}s)")


# %% Run: from the command line, or "Run all" in a notebook (which uses the constants as edited in Args)
if __name__ == "__main__":
    main(parse_args())
