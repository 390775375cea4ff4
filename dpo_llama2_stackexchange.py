"""DPO fine-tunes Llama 2 7B, loaded in 4-bit NF4 with LoRA adapters, on Stack Exchange answer preferences.

Each pair is a question from lvwerra/stack-exchange-paired with a preferred answer (response_j) and a less
preferred one (response_k). TRL's DPOTrainer trains LoRA adapters on the 4-bit base; the reference policy is the
same base with the adapters switched off, so only one copy of the 7B weights is ever in memory.

    python dpo_llama2_stackexchange.py --preset tiny --output_dir outputs/dpo_tiny   # offline, CPU, ~1 minute
    python dpo_llama2_stackexchange.py                                               # the real run (GPU, HF token)
    python dpo_llama2_stackexchange.py --model_name_or_path path/to/sft_checkpoint --beta 0.2

Every constant lives in `Args` below; a preset only changes defaults, and explicit flags always win.
"""

import argparse
import gc
import json
import os
import random
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from accelerate import PartialState
from datasets import load_dataset
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_torch_tf32_available
from trl import DPOConfig, DPOTrainer, TrlParser


def arg(default, help):
    """A dataclass field whose help text shows in `--help`."""
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------------
# Constants: edit these, or override any of them with `--name value` or a YAML file passed as `--config file.yaml`.
# Defaults follow TRL's stack_llama_2 DPO recipe.
# ----------------------------------------------------------------------------------------------------------------
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
    upcast_non_quantized: bool = arg(False, "keep a float32 copy of the embeddings, norms and lm_head, as peft's "
                                     "prepare_model_for_kbit_training does; off: they stay in the compute dtype "
                                     "(bf16 on a GPU), which moves half the bytes (no effect on a CPU: fp32 there)")

    # Data
    dataset_name: str = arg("lvwerra/stack-exchange-paired", "preference dataset: hub id or local directory")
    train_data_dir: str = arg("data/rl", "data_dir of the training pairs")
    eval_data_dir: str = arg("data/evaluation", "data_dir of the held-out pairs")
    max_train_samples: Optional[int] = arg(None, "cap on training pairs read (before filtering); None: all")
    max_eval_samples: int = arg(1000, "cap on held-out pairs read (before filtering)")
    max_prompt_length: int = arg(512, "drop pairs whose prompt is longer than this many tokens")
    max_length: int = arg(1024, "drop pairs whose prompt + answer (+ EOS) is longer than this many tokens")
    dataset_num_proc: Optional[int] = arg(None, "processes for dataset mapping; None: one")

    # DPO
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
    logging_steps: int = arg(10, "log metrics every N steps")
    eval_steps: int = arg(100, "evaluate on the held-out pairs every N steps; 0: never during training")
    save_steps: int = arg(100, "save a checkpoint every N steps; 0: no periodic checkpoints")
    resume: Optional[str] = arg(None, "continue from a checkpoint: 'latest' (bare --resume) or a checkpoint dir")

    # Evaluation and saving
    num_eval_generations: int = arg(3, "held-out questions answered by the base and the trained model")
    max_new_tokens: int = arg(128, "length of those generated answers")
    merge_full_model: bool = arg(False, "also save the base with the adapter merged in (reloads the base unquantised)")
    push_to_hub: bool = arg(False, "push the adapter and tokenizer to the hub")
    hub_model_id: Optional[str] = arg(None, "hub repo for push_to_hub; None: the output dir's name")
    report_to: str = arg("wandb", "wandb, tensorboard or none")
    run_name: Optional[str] = arg(None, "run name on the tracker; None: generated")
    device: str = arg("auto", "auto (CUDA when present), cuda or cpu")
    tf32: bool = arg(True, "on an Ampere or newer GPU, run fp32 matmuls on TF32 tensor cores")
    use_liger_kernel: Optional[bool] = arg(None, "Liger's fused linear DPO loss and Llama kernels (never builds "
                                           "full-vocabulary logits; H200: 1.25x faster steps, 1.7 GiB less). None: "
                                           "on where a GPU and liger-kernel are present; needs `pip install liger-kernel`")
    tiny_assets_dir: Optional[str] = arg(None, "with --preset tiny: where the tiny model and data are built")


# A preset changes only defaults. "{tiny}" stands for the directory the tiny assets are built in.
PRESETS = {
    "tiny": dict(
        model_name_or_path="{tiny}/llama",
        dataset_name="{tiny}/stack-exchange-paired",
        max_eval_samples=64,
        max_prompt_length=48,
        max_length=96,
        learning_rate=2e-3,
        warmup_steps=10,
        optim="adamw_torch",  # paged optimizers need CUDA
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=1,
        max_steps=150,
        logging_steps=10,
        eval_steps=50,
        save_steps=0,
        max_new_tokens=24,
        report_to="none",
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


OFFLINE_HINT = "`python dpo_llama2_stackexchange.py --preset tiny` runs the whole pipeline offline on a tiny model."


def looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def explain_load_error(err: Exception, name: str, setting: str) -> str:
    text = f"{type(err).__name__}: {err}"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "gated" in text.lower() or "401" in text or "403" in text:
        return (
            f"'{name}' (--{setting}) is a gated model and this machine has no access to it. Llama 2 needs two "
            f"things: accept Meta's license on the model's hub page with your account, then give this machine "
            f"your token (`huggingface-cli login`, or set HF_TOKEN). Or set --{setting} to an open model or a "
            f"local directory. {OFFLINE_HINT}"
        )
    offline_markers = ("couldn't connect", "couldn't reach", "offline", "localentrynotfound", "connection")
    if any(marker in text.lower() for marker in offline_markers):
        return (
            f"Could not load '{name}' (--{setting}): the Hugging Face Hub cannot be reached and it is not in the "
            f"local cache. Connect to the internet, or download it elsewhere and set --{setting} to its local "
            f"directory. {OFFLINE_HINT}"
        )
    return f"Could not load '{name}' (--{setting}): {first_line} Check --{setting}. {OFFLINE_HINT}"


def load_or_explain(load, name: str, setting: str):
    """Run `load(name)` and turn missing paths, gated repos and hub outages into one clear paragraph."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        fail(f"--{setting}={name!r} looks like a local path, but nothing exists there. {OFFLINE_HINT}")
    try:
        return load(os.path.expanduser(name) if looks_local(name) else name)
    except (OSError, ValueError) as err:  # hub, cache and file errors are OSError subclasses in HF libraries
        fail(explain_load_error(err, name, setting))


def on_gpu(args: Args) -> bool:
    return args.device != "cpu" and torch.cuda.is_available()


def validate(args: Args):
    """Catch settings that cannot work before anything is loaded."""
    positive = dict(
        max_prompt_length=args.max_prompt_length, max_length=args.max_length, max_steps=args.max_steps,
        learning_rate=args.learning_rate, beta=args.beta, per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size, lora_r=args.lora_r,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    for name, value in positive.items():
        if not value > 0:
            fail(f"--{name} must be positive, got {value}.")
    if args.max_prompt_length >= args.max_length:
        fail(f"--max_prompt_length ({args.max_prompt_length}) must be below --max_length ({args.max_length}): "
             f"the answer needs room.")
    if args.report_to not in ("wandb", "tensorboard", "none"):
        fail(f"--report_to must be wandb, tensorboard or none, got {args.report_to!r}.")
    if args.device not in ("auto", "cuda", "cpu"):
        fail(f"--device must be auto, cuda or cpu, got {args.device!r}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but PyTorch sees no CUDA device. Use --device auto or cpu.")
    if args.use_liger_kernel and not on_gpu(args):
        fail("--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton GPU kernels). Drop it on a CPU.")
    if args.use_liger_kernel and not liger_installed():
        fail("--use_liger_kernel needs the liger-kernel package, which is not installed: "
             "`pip install liger-kernel==0.8.5`, or drop --use_liger_kernel.")
    if args.use_liger_kernel is None and on_gpu(args) and not liger_installed():
        print("note: liger-kernel is not installed; with it (`pip install liger-kernel==0.8.5`) DPO steps run "
                  "about 1.25x faster on this GPU in less memory.")
    if args.optim.startswith("paged_") and not on_gpu(args):
        fail(f"--optim {args.optim} needs a CUDA GPU. On a CPU use --optim adamw_torch.")
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume!r} is not a directory. Use --resume alone for the latest checkpoint in "
             f"--output_dir, or give a checkpoint-N directory.")
    check_writable(args.output_dir)
    if args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # a broken native library raises more than ImportError
            fail(f"--load_in_4bit needs bitsandbytes, which cannot run here ({type(err).__name__}: {err}). "
                 f"Install a bitsandbytes build for this machine, or pass --load_in_4bit false (needs far more memory).")


def use_liger(args: Args) -> bool:
    """--use_liger_kernel as given; unset: on where a GPU and the package are present."""
    return args.use_liger_kernel if args.use_liger_kernel is not None else on_gpu(args) and liger_installed()


def liger_installed() -> bool:
    from trl.import_utils import is_liger_kernel_available

    return is_liger_kernel_available()


def check_writable(directory: str):
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_test_{os.getpid()}")  # one per process: no race
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        fail(f"--output_dir {directory!r} is not writable ({err.strerror}). Choose a directory you can write to.")


def check_context(args: Args):
    """The model must hold --max_length tokens: read its config before loading any weights."""
    config = load_or_explain(AutoConfig.from_pretrained, args.model_name_or_path, "model_name_or_path")
    context = getattr(config, "max_position_embeddings", None)
    if context and args.max_length > context:
        fail(f"--max_length ({args.max_length}) exceeds the model's context of {context} tokens. Lower --max_length.")


# ----------------------------------------------------------------------------------------------------------------
# Data: Stack Exchange pairs -> prompt / chosen / rejected, filtered by token length.
# ----------------------------------------------------------------------------------------------------------------
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


def load_pairs(args: Args, tokenizer, data_dir: str, cap: Optional[int]):
    """Read one data_dir, map to prompt/chosen/rejected, and drop pairs beyond the token limits (reported)."""
    dataset = load_or_explain(lambda name: load_dataset(name, data_dir=data_dir, split="train"),
                              args.dataset_name, "dataset_name")
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        fail(f"'{args.dataset_name}' ({data_dir}) lacks the column(s) {', '.join(missing)} (it has: "
             f"{', '.join(dataset.column_names)}). The script needs question, response_j (preferred) and "
             f"response_k (rejected): set --dataset_name to a dataset in that format.")
    if cap is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(cap, len(dataset))))
    read = len(dataset)
    dataset = dataset.map(lambda row: make_pair(row["question"], row["response_j"], row["response_k"]),
                          remove_columns=dataset.column_names, num_proc=args.dataset_num_proc)

    def count_tokens(batch):
        # Counted in tokens, as the trainer will see them (EOS included): characters say little about length.
        prompt = tokenizer(batch["prompt"])["input_ids"]
        chosen = tokenizer([p + c for p, c in zip(batch["prompt"], batch["chosen"])])["input_ids"]
        rejected = tokenizer([p + r for p, r in zip(batch["prompt"], batch["rejected"])])["input_ids"]
        return {"prompt_tokens": [len(ids) for ids in prompt],
                "total_tokens": [max(len(c), len(r)) + 1 for c, r in zip(chosen, rejected)]}

    dataset = dataset.map(count_tokens, batched=True, num_proc=args.dataset_num_proc)
    dataset = dataset.filter(
        lambda prompt, total: prompt <= args.max_prompt_length and total <= args.max_length,
        input_columns=["prompt_tokens", "total_tokens"], num_proc=args.dataset_num_proc)
    PartialState().print(f"{data_dir}: kept {len(dataset)} of {read} pairs; dropped {read - len(dataset)} over "
          f"--max_prompt_length {args.max_prompt_length} or --max_length {args.max_length} tokens")
    if len(dataset) == 0:
        fail(f"No pair in '{args.dataset_name}' ({data_dir}) fits --max_prompt_length {args.max_prompt_length} and "
             f"--max_length {args.max_length} tokens. Raise those limits, or read more pairs.")
    return dataset.remove_columns(["prompt_tokens", "total_tokens"])


# ----------------------------------------------------------------------------------------------------------------
# Model: one 4-bit base with LoRA adapters; the reference is that base with the adapters disabled.
# ----------------------------------------------------------------------------------------------------------------
def load_tokenizer(args: Args):
    tokenizer = load_or_explain(AutoTokenizer.from_pretrained, args.model_name_or_path, "model_name_or_path")
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


def guard_cpu_4bit_gradients(model):
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights on any eval-mode no-grad forward; a
    backward after that returns wrong LoRA gradients. Turning the repack off keeps gradients right (GPU: no-op)."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(args: Args):
    device = PartialState().local_process_index if on_gpu(args) else "cpu"  # each process its own GPU
    model = load_or_explain(
        lambda name: AutoModelForCausalLM.from_pretrained(
            name, quantization_config=quantization_config(args), dtype=compute_dtype(args), device_map={"": device}),
        args.model_name_or_path, "model_name_or_path")
    model.config.use_cache = False  # incompatible with gradient checkpointing during training
    if args.load_in_4bit:
        if device == "cpu":
            guard_cpu_4bit_gradients(model)
        if args.upcast_non_quantized:
            # Freezes the base, casts embeddings, norms and lm_head to fp32, turns on gradient checkpointing.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            # The same without the fp32 copies: with them the whole residual stream runs in fp32 (the embedding's
            # output is fp32), twice the bytes through every norm, residual add and LoRA input of every layer.
            model.requires_grad_(False)
            if args.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_config(args: Args, model) -> LoraConfig:
    """LoRA on every attention and MLP projection. (The anchor listed targets of which only q/k/v exist in Llama.)"""
    targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [name for name in targets if name not in present]
    if absent:
        fail(f"--lora_target_modules names {', '.join(absent)}, which this model does not have. Its linear layers "
             f"include: {', '.join(sorted(n for n in present if n.endswith('proj')))}.")
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: preference accuracy and margin on held-out pairs, plus a few generated answers.
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int) -> torch.Tensor:
    """Sum of log p(completion + EOS | prompt), tokenized the way DPOTrainer tokenizes pairs."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            prompt_ids = tokenizer(prompt)["input_ids"]
            rows.append(tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id])
            starts.append(len(prompt_ids))
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
    result["generations"] = [{"prompt": q, "answer": a}
                             for q, a in zip(questions, generate_answers(model, tokenizer, questions, args.max_new_tokens))]
    model.train(was_training)
    return result, logratios


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
    if wandb_run is not None:
        import wandb

        for name, result in (("base", base), ("trained", trained)):
            for key, value in result.items():
                if isinstance(value, float):
                    wandb_run.summary[f"eval/{name}/{key}"] = value
        rows = [[b["prompt"], b["answer"], t["answer"]] for b, t in zip(base["generations"], trained["generations"])]
        wandb_run.log({"eval/generations": wandb.Table(columns=["question", "base", "trained"], data=rows)})
        wandb_run.finish()  # flush and close the run: the evaluation is the last thing it records


# ----------------------------------------------------------------------------------------------------------------
# Training and saving
# ----------------------------------------------------------------------------------------------------------------
class StopRequest:
    """First Ctrl-C or SIGTERM: finish the current step, save a checkpoint and exit. A second one stops at once."""

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
        print(f"\n{self.signal_name}: finishing this step, then saving a checkpoint (again to stop at once).",
              file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + getattr(signal, self.signal_name)  # 130 for Ctrl-C, 143 for SIGTERM: the shell's convention


class StopOnSignal(TrainerCallback):
    """Turns a stop request into the Trainer's own save-and-stop at the end of the current step."""

    def __init__(self, stop: StopRequest):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signal_name:
            control.should_save = True
            control.should_training_stop = True


class QLoRADPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, with the LoRA weights kept in one dtype. TRL 1.12 casts them to bf16 for any 4-bit model
    (even on a CPU that computes in fp32), while resuming reloads them in fp32: a resumed run would continue in
    another precision than the run it resumes. Here they stay in the compute dtype: bf16 on GPU, fp32 on CPU."""

    def __init__(self, *args, adapter_dtype: torch.dtype, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_dtype = adapter_dtype
        self.cast_adapters()

    def cast_adapters(self):
        for param in self.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(self.adapter_dtype)

    def _load_from_checkpoint(self, *args, **kwargs):
        super()._load_from_checkpoint(*args, **kwargs)
        self.cast_adapters()  # before the optimizer is built from these parameters


def resolve_checkpoint(args: Args) -> Optional[str]:
    if args.resume is None:
        return None
    checkpoint = get_last_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
    if checkpoint is None:
        fail(f"--resume: no checkpoint-N directory in --output_dir {args.output_dir!r}. Give the output dir of the "
             f"interrupted run, or a checkpoint path.")
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


def build_dpo_config(args: Args) -> DPOConfig:
    gpu = on_gpu(args)
    return DPOConfig(
        output_dir=args.output_dir,
        seed=args.seed,
        beta=args.beta,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,  # the anchor declared 0.05 and never passed it
        optim=args.optim,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=args.max_length,
        max_steps=args.max_steps,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        report_to=args.report_to,
        run_name=args.run_name,
        dataset_num_proc=args.dataset_num_proc,  # the anchor read an undefined num_proc
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),  # TrainingArguments refuses bf16 on CPU
        tf32=args.tf32 if gpu and is_torch_tf32_available() else None,  # asking for TF32 without it raises
        use_liger_kernel=use_liger(args),
    )


def save_outputs(trainer, tokenizer, args: Args):
    """The LoRA adapter + tokenizer (PeftModel.from_pretrained(base, OUTPUT_DIR) loads them)."""
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
    if args.push_to_hub:
        repo = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        trainer.model.push_to_hub(repo)
        tokenizer.push_to_hub(repo)


def merge_full_model(args: Args, tokenizer):
    """Merge the adapter into an unquantised copy of the base (merging into 4-bit weights would lose precision)."""
    dtype = torch.bfloat16 if on_gpu(args) else torch.float32
    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, args.output_dir).merge_and_unload()
    merged.save_pretrained(os.path.join(args.output_dir, "merged"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
    print(f"Saved the merged model to {os.path.join(args.output_dir, 'merged')}")


# ----------------------------------------------------------------------------------------------------------------
# Tiny offline preset: a small Llama and preference set built here, saved to disk, loaded back through the same code.
# ----------------------------------------------------------------------------------------------------------------
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
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *bytes_], initial_alphabet=["▁"]))
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
            build_tiny_assets(args.tiny_assets_dir)
    check_context(args)
    checkpoint = resolve_checkpoint(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
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
    tokenizer = load_tokenizer(args)
    with PartialState().main_process_first():  # one process fills the datasets cache, the others read it
        train_pairs = load_pairs(args, tokenizer, args.train_data_dir, args.max_train_samples)
        eval_pairs = load_pairs(args, tokenizer, args.eval_data_dir, args.max_eval_samples)
    model = load_model(args)
    peft_config = lora_config(args, model)

    base_cache = os.path.join(args.output_dir, "base_eval.pt")  # a resumed run does not score the base again
    if checkpoint and os.path.exists(base_cache):
        base_result, base_logratios = torch.load(base_cache)
    else:
        say(f"Scoring the base model on {len(eval_pairs)} held-out pairs ...")
        base_result, base_logratios = evaluate(model, tokenizer, eval_pairs, args)
        if PartialState().is_main_process:
            torch.save((base_result, base_logratios), base_cache)
    trainer = QLoRADPOTrainer(
        model=model, ref_model=None,  # with a peft_config, the reference is the base with adapters disabled
        args=build_dpo_config(args), train_dataset=train_pairs,
        eval_dataset=eval_pairs if args.eval_steps > 0 else None, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[StopOnSignal(stop)], adapter_dtype=compute_dtype(args))
    if stop.signal_name:
        fail(f"Stopped by {stop.signal_name} before training began: nothing to save.")
    say(f"Training: {args.max_steps} DPO steps on {trainer.accelerator.num_processes} x {trainer.accelerator.device}"
        + (f", resuming from {checkpoint}" if checkpoint else ""))
    train_started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.time() - train_started
    steps = trainer.state.global_step
    if stop.signal_name:
        saved = os.path.join(args.output_dir, f"checkpoint-{steps}")
        print(f"\nStopped by {stop.signal_name} after step {steps} of {args.max_steps}; checkpoint saved in {saved}."
              f"\nResume with:\n  {resume_command(saved)}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code)
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
    save_outputs(trainer, tokenizer, args)  # before evaluation: nothing trained is lost if it fails

    trained_result, _ = evaluate(trainer.model, tokenizer, eval_pairs, args, base_logratios)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"base": base_result, "trained": trained_result, "args": asdict(args),
              "seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 2), "steps": steps,
              "seconds_per_step": round(train_seconds / max(steps, 1), 4), "peak_gpu_memory_gib": peak_gib,
              "first_logged_loss": losses[0] if losses else None,  # ln 2 = 0.6931 when logged at step 1
              "train_tokens": trainer._total_train_tokens}  # non-pad tokens of chosen and rejected, all processes
    if trainer.accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as handle:
            json.dump(result, handle, indent=2)
        wandb_run = None
        if args.report_to == "wandb":
            import wandb

            wandb_run = wandb.run
        report(base_result, trained_result, wandb_run)
        print(f"Saved the LoRA adapter, tokenizer and eval.json to {args.output_dir} ({result['seconds']}s)")
    if args.merge_full_model and trainer.accelerator.is_main_process:
        del trainer, model  # free the 4-bit base before loading an unquantised one
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        merge_full_model(args, tokenizer)
    return result


if __name__ == "__main__":
    main()
