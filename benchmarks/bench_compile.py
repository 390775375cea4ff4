"""Cold compilation and steady speed of the PPO epochs' pass, compiled whole or one transformer block at a time
(regional compilation), as the PPO script's --compile_ppo_epochs does with --compile_scope whole or blocks, at
GPT-2 124M shapes.

    python benchmarks/bench_compile.py --device cuda                       # reduce-overhead (CUDA graphs), ~3 min
    python benchmarks/bench_compile.py --arch tiny --device cpu --mode default   # the test's quick run

A probe for the lever the H200 rows of 2026-11-26 left open: compiled PPO epochs with CUDA graphs are what made
the fastest layout fast, and their cold compilation (about 40 s of its 63 s first update) is what kept it from
paying for itself within one pass over IMDB. On 2 CPU cores (torch 2.13; the H200 machine has 2.11), regional
compilation cut the first step from 36 s to 12 s with the same gradients (steady 1.48 s against 1.35 s). In the
script on an H200 (2026-11-27, bench_ppo.py with --compile_scope blocks) per block recorded its CUDA graphs with
none skipped: first update 20.7 s against 54.1 s cold, 0.276 s per update against 0.236 s. This benchmark times
the pass alone on a GPU (gpu_session.sh .old compile, not yet run there).

Each scope runs in a child process with empty inductor and Triton caches, so that its first step pays a cold
compilation. A step is what a PPO epoch's micro-batch does to the two models: the script's policy-and-value pass
(TRL's wrapper, no KV cache), a loss over every logit and value, backward, and fused AdamW on a GPU. In regional
scope the blocks run compiled only inside that pass, as in the script (the same blocks also generate and score
rollouts, at other shapes). Rows: the first step's seconds (compilation) and the second's (where
reduce-overhead records its CUDA graphs), steady seconds, graphs, graph breaks, CUDA graphs recorded and skipped,
the largest gradient difference to eager (third step, replaying the graphs, before any update), peak GPU memory
over the steady steps.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import record


def build(arch: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config
    from trl.trainer.utils import disable_dropout_in_model

    import ppo_gpt2_imdb as ppo

    shape = {} if arch == "gpt2" else dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(GPT2Config(**shape))
    value = AutoModelForSequenceClassification.from_config(GPT2Config(num_labels=1, **shape))
    wrapper = ppo.trl_ppo_module.PolicyAndValueWrapper(policy, value).to(device).train()
    disable_dropout_in_model(wrapper)
    return wrapper, policy.config.vocab_size


def child(scope: str, args) -> dict:
    """One scope, in this (fresh) process: eager gradients, then compile, first step, steady steps."""
    import torch
    from torch._dynamo.utils import counters

    import ppo_gpt2_imdb as ppo

    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the script's --tf32
    wrapper, vocab = build(args.arch, device)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(1, vocab, (args.batch_size, args.tokens), generator=generator).to(device)
    batch[: args.batch_size // 4, :3] = 0  # left padding, as TRL's batches have

    def loss():
        output, values = ppo.forward_without_kv_cache(wrapper, batch, 0)
        return output.logits.float().logsumexp(-1).mean() + values.float().square().mean()

    loss().backward()
    eager = [p.grad.clone() for p in wrapper.parameters()]
    wrapper.zero_grad(set_to_none=True)
    blocks = None
    if scope in ppo.COMPILE_SCOPES:
        ppo.compile_ppo_epochs(wrapper, args.mode, scope)  # as the script compiles it (--compile_scope)
        blocks = len(ppo.transformer_blocks(wrapper)) if scope == "blocks" else None
    optimizer = torch.optim.AdamW(wrapper.parameters(), lr=1e-6, fused=device == "cuda")

    def clock():
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    seconds = []
    for _ in range(3):  # compiles; records CUDA graphs (reduce-overhead); replays them: same weights each time
        started = clock()
        loss().backward()
        seconds.append(clock() - started)
        if len(seconds) < 3:
            wrapper.zero_grad(set_to_none=True)
    difference = max((p.grad - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                     for p, g in zip(wrapper.parameters(), eager))
    optimizer.step()  # its state is allocated here, untimed
    optimizer.zero_grad(set_to_none=True)
    del eager  # the reference gradients would count in the peak
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = clock()
    for _ in range(args.steps):
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    steady = (clock() - started) / args.steps
    return {"first_step_seconds": round(seconds[0], 3), "second_step_seconds": round(seconds[1], 3),
            "steady_seconds_per_step": round(steady, 4), "compiled_blocks": blocks,
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cuda_graphs_recorded": cuda_graphs_recorded(), "cuda_graph_skips": ppo.cuda_graph_skips(),
            "largest_relative_gradient_difference": float(f"{difference:.2e}"),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None}


def cuda_graphs_recorded():
    """How many CUDA graphs cudagraph trees recorded on GPU 0 (None without any, or where torch's internals differ).
    One per compiled piece means each block's graphs were recorded once; a count that grows with the steps means
    they were recorded again and again."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(0, False)
        return None if manager is None else next(manager.graph_counter)  # the next graph's number
    except Exception:  # an internal API: never let it cost the row
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "gpt2"], default="gpt2")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on a GPU, "
                                                     "default on a CPU)")
    parser.add_argument("--scopes", default="blocks,whole,eager", help="comma-separated: blocks, whole, eager")
    parser.add_argument("--batch_size", type=int, default=128, help="sequences per step (the PPO micro-batch)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per sequence (prompt 8 + response 16)")
    parser.add_argument("--steps", type=int, default=10, help="steady steps timed after the first")
    parser.add_argument("--timeout", type=int, default=110, help="seconds a scope may take before its row says so")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.mode = args.mode or ("reduce-overhead" if args.device == "cuda" else "default")
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    rows = {}
    for scope in args.scopes.split(","):
        caches = tempfile.mkdtemp(prefix=f"compile_{scope}_")  # cold: nothing compiled before
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(caches, "triton")}
        command = [sys.executable, os.path.abspath(__file__), "--child", scope, *sys.argv[1:]]
        started = time.time()
        try:
            completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
            stdout, stderr, failed = completed.stdout, completed.stderr, completed.returncode != 0
        except subprocess.TimeoutExpired:
            stdout, stderr, failed = "", f"timed out after {args.timeout} s", True
        print(f"--- {scope}: the end of its stderr\n{(stderr or '')[-3000:]}", flush=True)
        lines = [line for line in (stdout or "").splitlines() if line.startswith("RESULT ")]
        errors = [line for line in (stderr or "").splitlines() if "Error" in line or "timed out" in line]
        figures = json.loads(lines[-1][len("RESULT "):]) if lines and not failed else {
            "failed": (errors or (stderr or "no output").strip().splitlines() or ["no output"])[-1][:300]}
        figures["wall_seconds"] = round(time.time() - started, 1)
        rows[scope] = record("compile", {"arch": args.arch, "device": args.device, "scope": scope,
                                         "mode": None if scope == "eager" else args.mode,
                                         "batch_size": args.batch_size, "tokens": args.tokens}, figures)
    return rows


if __name__ == "__main__":
    main()
