"""ppo_gpt2_imdb.py as a user runs it, plus what the benchmarks measure and a user's run does not, written to
OUTPUT_DIR/benchmark.json beside eval.json:

    python benchmarks/measured_ppo.py [--script PATH] SCRIPT_FLAGS...   # PATH: another copy of the script (a baseline)

--trl_memory_freeing (among the flags) runs TRL's own loop, with the gc.collect() and CUDA cache emptying that the
script skips: TRL's example layout.

- rollout_seconds, optimisation_seconds: each update's two phases, in order. The rollout (generation, reward,
  reference and value passes, advantages) starts when TRL's loop draws the update's prompts; the optimisation (the
  PPO epochs) when the policy-and-value wrapper, which only the epochs call, is first called; it ends when TRL logs
  the update. A GPU is synchronised at each mark.
- PHASE_seconds_per_update: the mean over the updates after the first (warm-up); first_PHASE_seconds: the first
  update's own (a GPU run's compilation lands there).
- policy_ratio_error: mean |ratio - 1| over response tokens at a first PPO epoch with the trained weights, checked
  after the run (outside its timings) on the held-out prompts. Ideally 0: PPO's clipping sees any difference
  between the rollout's and the epochs' log-probabilities as policy change.
- cuda_graph_skips: compiled graphs this run ran without CUDA graphs (torch.compile's count; the reason is logged).
"""
import importlib.util
import itertools
import json
import os
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_script(path: Optional[str]):
    """The PPO script as a module: the repo's, or the copy at `path` under the script's own name (in a process of
    its own: it takes the name's place in sys.modules)."""
    if path is None or os.path.abspath(path) == os.path.join(REPO, "ppo_gpt2_imdb.py"):
        import ppo_gpt2_imdb

        return ppo_gpt2_imdb
    spec = importlib.util.spec_from_file_location("ppo_gpt2_imdb", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ppo_gpt2_imdb"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def measured_trainer(ppo, trl_memory_freeing: bool = False):
    """The script's SentimentPPOTrainer, subclassed to record each update's phases in `measured` and to check the
    policy ratio. Its names are its own: older copies of the script measured phases themselves, under theirs."""
    import torch
    from transformers import GenerationConfig

    trl = ppo.trl_ppo_module  # TRL's PPO loop calls its module's functions: the ratio check uses the same ones

    class MeasuredPPOTrainer(ppo.SentimentPPOTrainer):
        last = None  # the trainer main() built

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            type(self).last = self
            self.measured = {"rollout_seconds": [], "optimisation_seconds": []}
            self.phase_marks, self.prompt_batches = {}, self.dataloader
            self.dataloader = self.batches_marking_rollouts(self.dataloader)
            # Rollouts call the policy and value model apart: only the PPO epochs call the wrapper.
            self.accelerator.unwrap_model(self.model).register_forward_pre_hook(self.mark_optimisation)

        def train(self):
            if not trl_memory_freeing:
                return super().train()
            with self.rollout_generation():  # TRL's loop as it is, its per-update freeing included
                return ppo.PPOTrainer.train(self)

        def now(self) -> float:
            if self.accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # GPU work is queued: without waiting, it would land in the next phase
            return time.perf_counter()

        def batches_marking_rollouts(self, batches):
            for batch in batches:  # TRL's loop draws one per update, before its rollout
                self.phase_marks = {"rollout": self.now()}
                yield batch

        def mark_optimisation(self, module, inputs):
            if "rollout" in self.phase_marks and "optimisation" not in self.phase_marks:
                self.phase_marks["optimisation"] = self.now()

        def log(self, logs: dict, *args, **kwargs):
            if "objective/scores" in logs and "optimisation" in self.phase_marks:  # once per update, after the epochs
                marks, ended = self.phase_marks, self.now()
                self.measured["rollout_seconds"].append(round(marks["optimisation"] - marks["rollout"], 4))
                self.measured["optimisation_seconds"].append(round(ended - marks["optimisation"], 4))
                self.phase_marks = {}
            super().log(logs, *args, **kwargs)

        @torch.no_grad()
        def first_epoch_ratio_error(self, prompts) -> float:
            """The rollout's log-probabilities (generated as rollouts are: load precision, rollout padding, the
            static cache where the run uses one) against the PPO epochs' pass (the prepared model as the epochs run
            it, autocast included), before any optimizer step, on one rollout batch of `prompts`."""
            pad_token_id, temperature = self.processing_class.pad_token_id, self.args.temperature + 1e-7
            # A full rollout batch (prompts repeated): a smaller one would miss the static cache and, compiled, run
            # a micro-batch of a new size, which compiles the epochs' graph again.
            one_batch = itertools.islice(itertools.cycle(list(prompts)), self.args.local_batch_size)
            # The rollouts' own padding: their loader's collator (older copies built it in prompt_collator).
            collate = getattr(self.prompt_batches, "collator", None) or ppo.prompt_collator(self.processing_class,
                                                                                            self.settings)
            queries = collate([{"input_ids": ids} for ids in one_batch])["input_ids"].to(self.accelerator.device)
            config = GenerationConfig(max_new_tokens=self.args.response_length, temperature=temperature, top_k=0.0,
                                      top_p=1.0, do_sample=True)
            policy, context = self.accelerator.unwrap_model(self.model).policy, queries.shape[1]
            cuda = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), self.rollout_generation():  # training's random numbers stay
                query_responses, logits = trl.batch_generation(policy, queries, len(queries), pad_token_id, config)
            responses = query_responses[:, context:]
            rollout = trl.selective_log_softmax(logits, responses)
            # Training mode, gradients on, the epochs' micro-batch: a compiled run reuses its training graph.
            micro = min(self.args.per_device_train_batch_size, self.args.local_mini_batch_size)
            training, epoch = self.model.training, []
            self.model.train()
            with torch.enable_grad():
                for start in range(0, len(query_responses), micro):
                    output, _ = trl.forward(self.model, query_responses[start : start + micro], pad_token_id)
                    logits = output.logits[:, context - 1 : -1].detach().float() / temperature
                    epoch.append(trl.selective_log_softmax(logits, responses[start : start + micro]))
            self.model.train(training)
            eos = (responses == self.processing_class.eos_token_id).long()
            valid = torch.cumsum(eos, 1) - eos == 0  # tokens up to and including the first EOS; TRL masks the rest
            return ((torch.cat(epoch) - rollout).exp() - 1).abs()[valid].mean().item()

    return MeasuredPPOTrainer


def phase_means(measured: dict) -> dict:
    figures = {}
    for phase in ("rollout", "optimisation"):
        seconds = measured[f"{phase}_seconds"]
        steady = seconds[1:] or seconds
        figures[f"{phase}_seconds_per_update"] = round(sum(steady) / len(steady), 4) if steady else None
        figures[f"first_{phase}_seconds"] = seconds[0] if seconds else None
    return figures


def main(argv: Optional[list] = None) -> dict:
    """The script's main() with its trainer measured; returns what benchmark.json holds."""
    from accelerate import PartialState
    from torch._dynamo.utils import counters

    argv = sys.argv[1:] if argv is None else [str(token) for token in argv]
    script, argv = (argv[1], argv[2:]) if argv[:1] == ["--script"] else (None, argv)
    freeing, argv = "--trl_memory_freeing" in argv, [token for token in argv if token != "--trl_memory_freeing"]
    ppo = load_script(script)
    args = ppo.parse_args(argv)
    skips = counters["inductor"]["cudagraph_skips"]  # the process's count: earlier runs in it counted too
    original, ppo.SentimentPPOTrainer = ppo.SentimentPPOTrainer, measured_trainer(ppo, freeing)
    try:
        ppo.main(args)
    finally:
        trainer_class, ppo.SentimentPPOTrainer = ppo.SentimentPPOTrainer, original
    trainer = trainer_class.last
    error = trainer.first_epoch_ratio_error(trainer.eval_dataset["input_ids"])
    result = {**phase_means(trainer.measured), **trainer.measured, "policy_ratio_error": round(error, 6),
              "cuda_graph_skips": counters["inductor"]["cudagraph_skips"] - skips}
    if PartialState().is_main_process:
        with open(os.path.join(args.output_dir, "benchmark.json"), "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
