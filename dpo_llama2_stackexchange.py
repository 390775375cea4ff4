"""DPO fine-tunes Llama 2 7B, in 4-bit NF4 with LoRA adapters, on lvwerra/stack-exchange-paired: a question, a
preferred answer (response_j) and a less preferred one (response_k). The reference policy is the same base with the
adapters off, so only one copy of the 7B weights is ever in memory.

    python dpo_llama2_stackexchange.py --preset tiny --output_dir outputs/dpo_tiny   # offline, CPU, ~1 minute
    python dpo_llama2_stackexchange.py --beta 0.2                                    # the real run (GPU, HF token)

The constants in `Args` are the interface: edit them, or override any with `--name value`. The file is also a
notebook (`# %%` cells): "Run all" trains with them as edited. The recipe reads down to the first appendix.
"""

# %% Imports (each appendix imports what only it needs)
import gc
import logging
import os
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # CPU kernels notice (bitsandbytes#2064)
warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|generation_config).*", category=FutureWarning)

import torch
from accelerate import PartialState
from datasets import load_dataset
from datasets.utils.logging import disable_progress_bar
from peft import LoraConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, set_seed
from transformers.utils import logging as transformers_logging
from trl import DPOConfig

disable_progress_bar()  # datasets' per-map bars; the script says in one line what each step kept
transformers_logging.set_verbosity_error()  # load reports and deprecation notices; errors still show
transformers_logging.disable_progress_bar()  # weight-loading bars (training's own bar is on: disable_tqdm)
SCRIPT = "dpo_llama2_stackexchange.py"


def arg(default, help):  # a dataclass field whose help text shows in `--help`
    return field(default=default, metadata={"help": help})


# %% Settings: the constants of a run. Defaults follow TRL's stack_llama_2 DPO recipe.
@dataclass
class Args:
    preset: Optional[Literal["tiny"]] = arg(None, "tiny: build a tiny local Llama and preference set, run offline")
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
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass: less memory, more compute")

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
    warmup_steps: int = arg(100, "linear warmup, in optimizer steps")
    weight_decay: float = arg(0.05, "AdamW weight decay")
    optim: str = arg("paged_adamw_32bit", "optimizer, by transformers' name (paged: its state can move to CPU memory)")
    per_device_train_batch_size: int = arg(4, "pairs per device per forward pass")
    per_device_eval_batch_size: int = arg(1, "pairs per device per forward pass of the evaluations during training")
    gradient_accumulation_steps: int = arg(4, "forward passes per optimizer step")
    max_steps: int = arg(1000, "optimizer steps to train")

    # Evaluation
    num_eval_generations: int = arg(3, "held-out questions answered by the base and the trained model")
    max_new_tokens: int = arg(128, "most new tokens in each of those answers")

    # Tracking and saving
    report_to: Literal["wandb", "tensorboard", "none"] = arg("wandb", "tracker; without credentials wandb logs offline")
    wandb_project: str = arg("dpo_llama2_stackexchange", "wandb project the run is logged to")
    wandb_entity: Optional[str] = arg(None, "wandb team or user; None: your default entity")
    run_name: Optional[str] = arg(None, "run name on the tracker; None: generated")
    logging_steps: int = arg(10, "log metrics every N steps")
    eval_steps: int = arg(100, "evaluate on the held-out pairs every N steps; 0: never during training")
    save_steps: int = arg(100, "save a checkpoint every N steps; 0: no periodic checkpoints")
    resume: Optional[str] = arg(None, "continue from a checkpoint: 'latest' (bare --resume) or a checkpoint dir")
    overwrite_output_dir: bool = arg(False, "start over: delete the output dir's eval.json, models and checkpoints")
    merge_full_model: bool = arg(False, "also save the base with the adapter merged in (reloads the base unquantised)")

    # System and speed
    device: Literal["auto", "cuda", "cpu"] = arg("auto", "auto: CUDA when present")
    tf32: bool = arg(True, "run fp32 matmuls in TF32 where the GPU has it")
    use_liger_kernel: bool = arg(True, "Liger's fused DPO loss and kernels, where a GPU and liger-kernel are present")
    tiny_assets_dir: Optional[str] = arg(None, "with --preset tiny: where the tiny model and data are built")


# A preset changes only defaults (explicit flags win) and prints what it changed. "{tiny}" stands for the
# directory the tiny assets are built in.
PRESETS = {
    "tiny": dict(model_name_or_path="{tiny}/llama", dataset_name="{tiny}/stack-exchange-paired", max_eval_samples=64,
                 max_prompt_length=48, max_length=96, learning_rate=2e-3, warmup_steps=10,
                 optim="adamw_torch",  # paged optimizers need CUDA
                 per_device_train_batch_size=16, per_device_eval_batch_size=16, gradient_accumulation_steps=1,
                 max_steps=150, logging_steps=10, eval_steps=50, save_steps=0, max_new_tokens=24, beta=0.5),
}


# %% 1. Data: Stack Exchange pairs -> prompt / chosen / rejected, filtered by token length.
REQUIRED_COLUMNS = ("question", "response_j", "response_k")


def make_pair(question: str, chosen: str, rejected: str) -> dict:
    """The recipe's text, "Question: {q}\\n\\nAnswer: {answer}", split so that the prompt's tokens are a prefix of the
    whole text's. Llama's tokenizer merges a space into the word after it ("▁Hello"): a prompt ending in "Answer: "
    tokenizes alone with a stray "▁", and TRL 1.12 then cuts the first word off every answer. So the space starts
    each answer instead; the full text is the same."""
    return {"prompt": f"Question: {question}\n\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected}


def unusable(question, chosen, rejected) -> str:  # why a pair cannot teach a preference ("" when it can)
    if not all(isinstance(text, str) for text in (question, chosen, rejected)):
        return "missing"  # a question or an answer is absent (None)
    if not chosen.strip() or not rejected.strip():
        return "empty"
    return "identical" if chosen.strip() == rejected.strip() else ""


def load_pairs(args: Args, tokenizer, data_dir: str, cap: Optional[int], setting: str):
    """One data_dir's usable pairs as prompt/chosen/rejected; one line counts those dropped, per reason."""
    dataset = load_or_explain(lambda name: load_dataset(name, data_dir=data_dir, split="train"),
                              args.dataset_name, "dataset_name", related=setting)
    check_columns(args, dataset, data_dir)
    if cap is not None:
        dataset = dataset.shuffle(seed=args.seed).select(range(min(cap, len(dataset))))
    reasons = Counter(unusable(*row) for row in zip(*(dataset[column] for column in REQUIRED_COLUMNS)))
    usable = dataset.filter(lambda *row: not unusable(*row), input_columns=list(REQUIRED_COLUMNS))
    pairs = usable.map(lambda row: make_pair(row["question"], row["response_j"], row["response_k"]),
                       remove_columns=usable.column_names, num_proc=args.dataset_num_proc)

    def fits(batch):  # in tokens, as the trainer counts them (EOS included): characters say little about length
        prompts = tokenizer(batch["prompt"])["input_ids"]
        chosen = tokenizer([p + c for p, c in zip(batch["prompt"], batch["chosen"])])["input_ids"]
        rejected = tokenizer([p + r for p, r in zip(batch["prompt"], batch["rejected"])])["input_ids"]
        return [len(p) <= args.max_prompt_length and max(len(c), len(r)) + 1 <= args.max_length
                for p, c, r in zip(prompts, chosen, rejected)]

    pairs = pairs.filter(fits, batched=True, num_proc=args.dataset_num_proc)
    counts = (f"of {len(dataset)} pairs; dropped {reasons['missing']} with a missing question or answer, "
              f"{reasons['empty']} with an empty answer, {reasons['identical']} with identical answers, "
              f"{len(usable) - len(pairs)} over --max_prompt_length {args.max_prompt_length} or --max_length "
              f"{args.max_length} tokens")
    PartialState().print(f"{data_dir}: kept {len(pairs)} {counts}")
    check_pairs_left(args, data_dir, counts, len(pairs))
    return pairs


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
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(args)) if args.load_in_4bit else None


def load_model(args: Args):
    """The base, every weight frozen: the trainer adds the LoRA adapters and turns gradient checkpointing on."""
    check_context_length(args, load_or_explain(AutoConfig.from_pretrained, args.model_name_or_path,
                                               "model_name_or_path"))  # from the config, before any weight loads
    device = PartialState().local_process_index if on_gpu(args) else "cpu"  # each process its own GPU
    model = load_or_explain(
        lambda name: AutoModelForCausalLM.from_pretrained(
            name, quantization_config=quantization_config(args), dtype=compute_dtype(args), device_map={"": device}),
        args.model_name_or_path, "model_name_or_path")
    model.config.use_cache = False  # incompatible with gradient checkpointing during training
    for module in model.modules():  # each Linear4bit: its CPU repack breaks LoRA gradients (Appendix A)
        if hasattr(module, "support_avx512bf16_for_cpu"):  # acts only on CPU inputs: harmless on a GPU
            module.support_avx512bf16_for_cpu = False
    return model.requires_grad_(False)


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
        eval_strategy="steps" if args.eval_steps else "no", eval_steps=args.eval_steps or None,  # validated: >= 0
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=args.report_to, run_name=args.run_name,
        disable_tqdm=False,  # a progress bar with the step count and time left (quiet library logs would hide it)
        dataset_num_proc=args.dataset_num_proc,  # the anchor read an undefined num_proc
        use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(),  # TrainingArguments refuses bf16 on CPU
        tf32=args.tf32 if gpu and is_torch_tf32_available() else None,  # asking for TF32 where there is none raises
        use_liger_kernel=args.use_liger_kernel and gpu and liger_installed(),
    )


# %% 4. Train: the recipe in order. main() runs every stage; 5 and 6 are the functions below it.
def main(args: Args) -> dict:  # trains and evaluates as `args` says; returns what eval.json holds
    started = time.time()
    validate(args)  # 0. Before anything is loaded: settings that cannot work, finished runs, seed and tracker
    with StopRequest() as stop:  # Ctrl-C or SIGTERM, from here to the end: see Appendix C
        PartialState(cpu=not on_gpu(args))  # the first PartialState fixes the process group: CPU without a GPU
        checkpoint = prepare_output_dir(args, checkpoint_marker="trainer_state.json")
        if args.preset == "tiny":
            with PartialState().main_process_first():  # after the refusals; one process builds, others reuse
                build_tiny_assets(args.tiny_assets_dir)
        set_seed(args.seed)
        prepare_tracking(args)

        # 1. Data
        tokenizer = load_tokenizer(args)
        with PartialState().main_process_first():  # one process fills the datasets cache, the others read it
            train_pairs = load_pairs(args, tokenizer, args.train_data_dir, args.max_train_samples, "train_data_dir")
            eval_pairs = load_pairs(args, tokenizer, args.eval_data_dir, args.max_eval_samples, "eval_data_dir")

        # 2. Model: the 4-bit base; the trainer adds the LoRA adapters of lora_config
        model = load_model(args)

        # 3. Trainer (reference = the same base with the adapters disabled: ref_model=None with a peft_config)
        trainer = QLoRADPOTrainer(model=model, ref_model=None, args=build_dpo_config(args), train_dataset=train_pairs,
                                  eval_dataset=eval_pairs if args.eval_steps > 0 else None, processing_class=tokenizer,
                                  peft_config=lora_config(args, model), adapter_dtype=compute_dtype(args), stop=stop)

        # 4. Train, then save the adapter and tokenizer at once: nothing trained is lost if anything later fails
        PartialState().print(f"Training: {args.max_steps} DPO steps on {trainer.accelerator.num_processes} x "
                             f"{trainer.accelerator.device}" + (f", resuming from {checkpoint}" if checkpoint else ""))
        stop.enter("training")
        train_started = time.time()
        trainer.train(resume_from_checkpoint=checkpoint)  # on Ctrl-C or SIGTERM: exits after a checkpoint
        figures = training_figures(trainer, checkpoint, time.time() - train_started)
        stop.enter("saving")
        save_atomically(args.output_dir, trainer.save_model, "the trained adapter")  # for PeftModel.from_pretrained
        stop.enter("evaluation")

        # 5. Evaluate the base (adapters off) and the trained model on the same held-out pairs
        PartialState().print(f"Evaluating the base and the trained model on {len(eval_pairs)} held-out pairs ...")
        with trainer.model.disable_adapter():
            base_result, base_logratios = evaluate(trainer.model, tokenizer, eval_pairs, args)
        trained_result, _ = evaluate(trainer.model, tokenizer, eval_pairs, args, base_logratios)

        # 6. Report: eval.json, the table, the tracker's summary; then the merged model if asked for
        result = {"base": base_result, "trained": trained_result, "args": asdict(args),
                  "seconds": round(time.time() - started, 1), **figures}
        if PartialState().is_main_process:
            save_atomically(args.output_dir, lambda to: write_json(f"{to}/eval.json", result), "eval.json", False)
            stop.enter("reporting")
            report(base_result, trained_result, args)
            print(f"Saved the LoRA adapter, tokenizer and eval.json to {args.output_dir} ({result['seconds']}s)")
            if args.merge_full_model:
                del trainer, model  # the 4-bit base goes before an unquantised one is loaded
                merge_full_model(args, tokenizer)
    return result


# %% 5. Evaluate: preference accuracy and margin on held-out pairs, plus a few generated answers.
@torch.no_grad()
def evaluate(model, tokenizer, pairs, args: Args, base_logratios: Optional[torch.Tensor] = None):
    """Preference of `model` on held-out pairs: accuracy = share of pairs where the chosen answer is more likely
    than the rejected one, margin = beta * mean log-likelihood gap. Against the base, also DPO's implicit reward.
    Returns the result and the per-pair log-likelihood gaps (the base's are the reference for the trained model)."""

    def logp(prompt: str, answer: str) -> float:  # log p(answer + EOS | prompt), tokenized as DPOTrainer does
        start = len(tokenizer(prompt)["input_ids"])
        ids = torch.tensor([tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]], device=model.device)
        logps = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, start - 1 : -1].float(), -1)
        return logps.gather(-1, ids[0, start:, None]).sum().item()

    model.eval()
    logratios = torch.tensor([logp(p, c) - logp(p, r)
                              for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])])
    result = {"accuracy": (logratios > 0).float().mean().item(), "margin": args.beta * logratios.mean().item(),
              "num_pairs": len(logratios), "generations": []}
    if base_logratios is not None:  # DPO's implicit reward: beta * (log-ratio of the policy - that of the reference)
        implicit = args.beta * (logratios - base_logratios)
        result.update(implicit_reward_accuracy=(implicit > 0).float().mean().item(),
                      implicit_reward_margin=implicit.mean().item())
    for prompt in list(pairs["prompt"])[: args.num_eval_generations]:
        batch = tokenizer(prompt, return_tensors="pt").to(model.device)
        output = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        result["generations"].append({"prompt": prompt, "answer": answer})
    return result, logratios


# %% 6. Report: the before/after table, the tracker's summary, and the merged model if asked for.
def report(base: dict, trained: dict, args: Args):
    print("\n=== Held-out preference evaluation ===================================")
    print(f"{'':8} {'accuracy':>9} {'margin':>9} {'implicit reward acc':>20} {'implicit margin':>16}")
    print(f"{'base':8} {base['accuracy']:9.3f} {base['margin']:9.3f}")
    print(f"{'trained':8} {trained['accuracy']:9.3f} {trained['margin']:9.3f} "
          f"{trained['implicit_reward_accuracy']:20.3f} {trained['implicit_reward_margin']:16.3f}")
    for before, after in zip(base["generations"], trained["generations"]):
        print(f"\n{before['prompt']}\n  base:    {before['answer']!r}\n  trained: {after['answer']!r}")
    print("=======================================================================\n")
    summary = {f"eval/{name}/{key}": value for name, result in (("base", base), ("trained", trained))
               for key, value in result.items() if isinstance(value, float)}
    rows = [[b["prompt"], b["answer"], t["answer"]] for b, t in zip(base["generations"], trained["generations"])]
    log_evaluation(args, summary, "eval/generations", rows, ["question", "base", "trained"])


def merge_full_model(args: Args, tokenizer):
    """The adapter merged into an unquantised copy of the base (merging into 4-bit weights would lose precision)."""
    gc.collect()  # the 4-bit base, let go by the caller
    torch.cuda.empty_cache()  # a no-op where CUDA was never used
    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=compute_dtype(args))
    merged = PeftModel.from_pretrained(base, args.output_dir).merge_and_unload()

    def save(staging: str):
        merged.save_pretrained(os.path.join(staging, "merged"))
        tokenizer.save_pretrained(os.path.join(staging, "merged"))

    save_atomically(args.output_dir, save, "the merged model", everyone=False)
    print(f"Saved the merged model to {os.path.join(args.output_dir, 'merged')}")


# %% Appendix A: the trainer, as built on TRL 1.12, peft, bitsandbytes and transformers. Every contact with their
# internals, and why:
# - DPOTrainer's adapter cast (QLoRADPOTrainer.cast_adapters, after __init__ and _load_from_checkpoint): TRL casts a
#   4-bit model's LoRA weights to bf16, even on a CPU that computes in fp32, and a resume reloads them in fp32; here
#   both stay in the compute dtype, so that a resumed run goes on in the precision of the run it resumes
# - Trainer._save_checkpoint, redirected through Trainer._get_output_dir: each checkpoint is written into
#   OUTPUT_DIR/.saving and renamed once complete, so that a crash while saving leaves none that looks complete
# - the trainer is its own TrainerCallback (on_step_end, on_save): Ctrl-C or SIGTERM becomes the Trainer's own
#   checkpoint at the end of the current step, then an exit that prints the command to resume
# - DPOTrainer._total_train_tokens: the non-pad tokens trained on in this run, for eval.json (training_figures)
# - bitsandbytes' Linear4bit.support_avx512bf16_for_cpu, off (load_model): its CPU repack in an eval pass breaks the
#   LoRA gradients of every later backward pass (bitsandbytes 0.50, CPUs with AVX512-BF16)
# - DPOConfig.use_liger_kernel where trl.import_utils finds liger-kernel, on a GPU: TRL's fused DPO loss
from transformers import TrainerCallback
from trl import DPOTrainer
from trl.import_utils import is_liger_kernel_available as liger_installed


class QLoRADPOTrainer(DPOTrainer, TrainerCallback):
    """TRL's DPOTrainer, and its own callback, with the changes the list above names."""

    def __init__(self, *args, adapter_dtype: torch.dtype, stop: "StopRequest", **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_dtype, self.stop, self.stopping = adapter_dtype, stop, False
        self.cast_adapters()
        self.add_callback(self)  # on_step_end and on_save below

    def cast_adapters(self):
        for param in self.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(self.adapter_dtype)

    def _load_from_checkpoint(self, *args, **kwargs):
        super()._load_from_checkpoint(*args, **kwargs)
        self.cast_adapters()  # before the optimizer is built from these parameters

    def _save_checkpoint(self, model, trial):
        def save(staging: str):
            self._get_output_dir = lambda trial=None: staging  # where the Trainer puts checkpoint-N
            try:
                super(QLoRADPOTrainer, self)._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir

        save_atomically(self.args.output_dir, save, f"checkpoint-{self.state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):  # a stop asked for on any process: save, then exit
        self.stopping = self.stop.requested(self.accelerator)  # the same on every process
        control.should_save = control.should_save or self.stopping

    def on_save(self, args, state, control, **kwargs):
        if self.stopping:
            self.stop.exit_after_checkpoint(f"after step {state.global_step} of {state.max_steps}",
                                            os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def training_figures(trainer, checkpoint: Optional[str], train_seconds: float) -> dict:
    """This run's steps, time, tokens and peak memory, and the loss at each logged step, for eval.json."""
    steps = trainer.state.global_step
    steps_this_run = steps - (json.loads(pathlib.Path(checkpoint, "trainer_state.json").read_text())["global_step"]
                              if checkpoint else 0)
    return {"train_seconds": round(train_seconds, 2), "steps": steps, "steps_this_run": steps_this_run,
            "train_tokens": trainer._total_train_tokens,  # non-pad tokens of chosen and rejected, this run
            "tokens_per_second": round(trainer._total_train_tokens / train_seconds, 1),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if torch.cuda.is_available() else None,
            "train_log": [{key: entry[key] for key in ("step", "loss", "grad_norm") if key in entry}
                          for entry in trainer.state.log_history if "loss" in entry]}  # step 1's loss: ln 2


# %% Appendix B: this script's checks: one paragraph naming the setting to change, as early as the facts are known.
# Settings that shape training's course: a resumed run must use those its checkpoint's run used (settings.json in
# the output dir), or it would end where neither run would. The others (tracking, saving, speed) may change.
RESUME_MUST_MATCH = ("model_name_or_path", "load_in_4bit", "dataset_name", "train_data_dir", "seed", "learning_rate",
                     "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "max_steps", "beta", "lora_r", "lora_alpha", "lora_dropout",
                     "lora_target_modules", "max_prompt_length", "max_length", "max_train_samples")
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames


def validate(args: Args):  # before anything is loaded
    positive = ["max_prompt_length", "max_length", "max_steps", "learning_rate", "beta", "lora_r", "lora_alpha",
                "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "max_eval_samples", "max_train_samples"]
    check_ranges(args, positive, at_least_0=["save_steps", "eval_steps", "warmup_steps", "weight_decay",
                                             "num_eval_generations"])
    if not 0 <= args.lora_dropout < 1:
        fail(f"--lora_dropout must be at least 0 and below 1, got {args.lora_dropout}.")
    if not any(name.strip() for name in args.lora_target_modules.split(",")):
        fail(f"--lora_target_modules names no module (got {args.lora_target_modules!r}): give the comma-separated "
             f"names of the linear layers LoRA adapts, such as {Args.lora_target_modules}.")
    for name, known in (("lr_scheduler_type", SchedulerType), ("optim", OptimizerNames)):
        if getattr(args, name) not in (choices := [choice.value for choice in known]):
            fail(f"--{name} {getattr(args, name)!r} is not one transformers knows. It takes: {', '.join(choices)}.")
    if args.max_prompt_length >= args.max_length:
        fail(f"--max_prompt_length ({args.max_prompt_length}) must be below --max_length ({args.max_length}): "
             f"the answer needs room.")
    validate_common(args)
    if args.optim.startswith("paged_") and not on_gpu(args):
        fail(f"--optim {args.optim} needs a CUDA GPU. On a CPU use --optim adamw_torch.")
    if args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # a broken native library raises more than ImportError
            fail(f"--load_in_4bit needs bitsandbytes, which cannot run here ({type(err).__name__}: {err}). "
                 f"Install a bitsandbytes build for this machine, or pass --load_in_4bit false (far more memory).")


def check_columns(args: Args, dataset, data_dir: str):
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        fail(f"'{args.dataset_name}' ({data_dir}) lacks the column(s) {', '.join(missing)} (it has: "
             f"{', '.join(dataset.column_names)}). The script needs question, response_j (preferred) and "
             f"response_k (rejected): set --dataset_name to a dataset in that format.")


def check_pairs_left(args: Args, data_dir: str, counts: str, kept: int):
    if kept == 0:
        fail(f"No usable pair is left in '{args.dataset_name}' ({data_dir}): kept none {counts}. Check the data's "
             f"columns ({', '.join(REQUIRED_COLUMNS)}), or raise those token limits.")


def check_context_length(args: Args, config):
    context = getattr(config, "max_position_embeddings", None)
    if context and args.max_length > context:
        fail(f"--max_length ({args.max_length}) exceeds the model's context of {context} tokens. Lower --max_length.")


def check_lora_targets(targets: list, model):
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [name for name in targets if name not in present]
    if absent:
        fail(f"--lora_target_modules names {', '.join(absent)}, which this model does not have. Its linear layers "
             f"include: {', '.join(sorted(n for n in present if n.endswith('proj')))}.")


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


# %% Appendix D: tiny offline preset: a small Llama and preference set built here, saved to disk, and loaded
# back through the same code as a real run's.
import random

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
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    print(f"Building the tiny preset's models and data in {directory} (once; under a minute) ...", flush=True)
    started = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    splits = {"rl": synthetic_pairs(rng, 600, 0), "evaluation": synthetic_pairs(rng, 120, 10_000)}
    for data_dir, rows in splits.items():
        Dataset.from_list(rows).to_json(os.path.join(directory, "stack-exchange-paired", "data", data_dir,
                                                     "train.jsonl"))
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
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *bytes_], initial_alphabet=["▁"],
        show_progress=False))
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
    write_json(marker, {"built_in_seconds": round(time.time() - started, 1)})
    print(f"Built a tiny Llama and preference set in {directory} ({time.time() - started:.1f}s)")


# %% Run: from the command line, or "Run all" in a notebook (which uses the constants as edited in Args)
if __name__ == "__main__":
    main(parse_args())
