#!/usr/bin/env bash
# On a lent GPU machine (see ../shared/stack-notes.md): the current scripts against an older copy of them in
# BASELINE_DIR (default .old: `git archive <commit> ppo_gpt2_imdb.py dpo_llama2_stackexchange.py | tar -x -C .old`),
# measured in the same call, plus each lever against the current defaults. One call per group fits the 10-minute
# limit of a call:
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old ppo    # about 7 min
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old dpo    # about 8 min; carry the liger-kernel wheel
#                                                                    # (fetch-wheels.sh liger-kernel==0.8.5)
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old compile   # up to 8 min: regional compilation, the
#                                                                       # cudagraphs backend
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old logprobs  # up to 9 min: TRL's log-probabilities
#                                                                       # against the script's chunks
# Each part runs on its own (a layout that fails gets a row saying why, and the rest still runs); a part that cannot
# finish before DEADLINE seconds (default 570) is skipped, not cut off. Timed rows come first, profiles last. Logs,
# the RESULTS.md rows and all profiles (in one file, profiles.txt: the device tool returns at most 8 files) land in
# $OUT after every part.
set -u
BASELINE=${1:-.old}
GROUP=${2:-}
if [[ $GROUP != ppo && $GROUP != dpo && $GROUP != compile && $GROUP != logprobs ]]; then
  echo "usage: bash benchmarks/gpu_session.sh BASELINE_DIR ppo|dpo|compile|logprobs   (one group per call)"
  exit 2
fi
if [[ ! -f $BASELINE/ppo_gpt2_imdb.py || ! -f $BASELINE/dpo_llama2_stackexchange.py ]]; then
  echo "$BASELINE holds no copy of the scripts: git archive <commit> ppo_gpt2_imdb.py dpo_llama2_stackexchange.py" \
    "| tar -x -C $BASELINE here, and name it in the run's carry (it is git-ignored)"
  exit 2
fi
DEADLINE=${DEADLINE:-570}
OUT=${OUT:-/tmp/gpu_session}
W=/tmp/bench_work
EAGER_FP32="--static_cache_generation false --compile_ppo_epochs none --bf16_autocast false"  # the old defaults' layout
mkdir -p "$OUT" "$W/ppo" "$W/dpo"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if (( SECONDS + limit > DEADLINE )); then
    echo "== $name: skipped (needs up to $limit s, $((DEADLINE - SECONDS)) s left)"; return
  fi
  local started=$SECONDS
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1  # the scripts finish their update on SIGTERM
  echo "== $name: exit $? after $((SECONDS - started)) s"
  grep '^{"benchmark"' "$OUT/$name.log" | python3 -c "import json,sys
for line in sys.stdin:
    row=json.loads(line); s=row['settings']; print('  ', s.get('layout', s.get('comparison', s.get('scope'))), row['figures'])"
  tail -n 3 "$OUT/$name.log" | grep -i -E "error|Traceback" | head -n 3
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  local profile
  for profile in "$W"/*/*.profile.txt; do
    [[ -e $profile ]] && printf '\n===== %s\n' "$profile" && cat "$profile"
  done > "$OUT/profiles.txt"
}

if [[ $GROUP == ppo ]]; then
  # GPT-2 124M + DistilBERT 66M shapes, 12 updates of 128. The machine's inductor and Triton caches start empty,
  # and later rows find what earlier ones compiled, so the order matters. At GPT-2's size the update is
  # launch-bound, and CUDA graphs remove the launches whatever the kernels. Measured before (H200):
  # - 2026-11-26: the static cache alone (1.25x), compiled epochs in default mode, alone and with it, compiled with
  #   CUDA graphs alone; inductor's whole PPO pass under CUDA graphs with the static cache, fp32: 1.76x steady
  #   (0.349 s/update), cold first update 62.9 s, one IMDB pass 130.5 s against the old code's 119.8 s.
  # - 2026-11-27, call 1: torch.compile's stock cudagraphs backend (CUDA graphs of the eager kernels, nothing
  #   generated): 1.46x, first update 13.0 s, one pass 91.9 s (old code 115.5 s), no skips, but 13.35 GiB: it
  #   copied every parameter into the graphs' buffers before each replay. Profile (epochs only, fp32): GPU busy
  #   0.25 s of a 0.50 s profiled update; the PPO epochs' backward 110 ms and forward 55 ms of it, fp32 attention
  #   29 ms.
  # - 2026-11-27, call 2 (the old code slow in that call: 0.790 s/update, against 0.592 in call 1): the script's
  #   backend (parameters held in place) 0.360 s, 12.58 GiB, pass 89.9 s; with bf16 autocast 0.317 s; inductor's
  #   whole pass with the static cache and bf16 autocast 0.230 s/update (3.43x in that call, 2.57x against call
  #   1's old code), 8.93 GiB, pass 83.5 s with the decode's compile cached (its cold 12.4 s measured in the row
  #   before). That layout became the defaults.
  # - 2026-11-27, call 3 (this group as it stands): the old code 0.681 s/update; the defaults, every cache empty,
  #   0.236 s (2.89x), first update 54.1 s, one pass 99.9 s against 132.9 s, 8.93 GiB; eager fp32 0.526 s; the
  #   script's cudagraphs backend under autocast 0.310 s; per block 0.266 s (cold, in a fourth call: 0.276 s, first
  #   update 20.7 s, one pass 74.3 s). Profile of the defaults' update 3: GPU busy 0.137 s of 0.294 s; 3,944
  #   cudaLaunchKernel calls beside 23 graph replays (profiles.txt), from the eager code around the graphs (the
  #   rollout's reference, reward and value passes in fp32, sampling, advantages): the next lever.
  # The order: the defaults first after the old code, so their first update is what a user's first run pays, cold;
  # the eager fp32 layout; the cudagraphs backend under autocast; the epochs compiled per block. Then the defaults
  # once more, 3 updates, to profile update 3.
  backend="--compile_decode cudagraphs --compile_ppo_epochs cudagraphs"
  part ppo 480 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 --work_dir "$W/ppo" \
    --baseline "$BASELINE" --profile_step 3 --profile_layouts script-defaults \
    --variant "eager-fp32: $EAGER_FP32" \
    --variant "static-cache-cudagraphs-backend-bf16: $backend" \
    --variant "static-cache-blocks-cudagraphs-bf16: --compile_scope blocks"
fi

if [[ $GROUP == dpo ]]; then
  # Llama-2-7B shapes in NF4 + LoRA at length 1024; the defaults use Liger's fused loss where it is installed.
  # Liger's share was measured in the earlier session (4.90 -> 3.92 s/step); this call spends its time on the
  # spread-length set instead, where --group_by_length can show (real, non-pad tokens/s). That set's 128 pairs
  # group only 2 steps at a time (a real run: 50), so it understates grouping; its 4 timed steps mix long and short.
  part dpo 180 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 4 \
    --gradient_accumulation_steps 4 --work_dir "$W/dpo" --baseline "$BASELINE"
  part dpo_spread_lengths 260 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 5 --batch_size 4 \
    --gradient_accumulation_steps 4 --lengths spread --work_dir "$W/dpo_spread" --baseline "$BASELINE" \
    --name spread-lengths --variant "group-by-length: --group_by_length true"
  part dpo_batch1 70 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 1 \
    --work_dir "$W/dpo" --name batch-1
fi

if [[ $GROUP == compile ]]; then
  # The PPO epochs' pass at GPT-2 shapes (128 x 24 tokens), eager, compiled whole and compiled one block at a time,
  # each in a process with empty compile caches, under CUDA graphs: cold compilation, steady step, graphs, gradients.
  # First the cudagraphs backend (--compile_ppo_epochs cudagraphs), which generates no code: its first step is
  # tracing and recording alone.
  part compile_cudagraphs_backend 150 python3 benchmarks/bench_compile.py --device cuda --mode cudagraphs \
    --scopes blocks,whole
  part compile 330 python3 benchmarks/bench_compile.py --device cuda
fi

if [[ $GROUP == logprobs ]]; then
  # The script's chunked log-probabilities (--logprob_chunk_mib 32, the default) against TRL's row-by-row loop
  # (--logprob_chunk_mib 0). 2026-11-27, fifth call, eager fp32 layout, chunks first: TRL's ran faster, 0.478
  # against 0.534 s/update, all in the rollout (0.188 against 0.248 s); unexplained, as the chunks make fewer, larger
  # reductions. Here each layout runs chunks, TRL's, chunks again (the order's own effect shows as the difference
  # between the two chunked rows), eager fp32 first, then the defaults (their first row compiles cold). The eager
  # part adds 4 MiB chunks (about one prompt's logits at GPT-2 shapes, as TRL's rows are): if they run as fast as
  # TRL's, the chunk's size is the cause, not the code.
  part logprobs_eager 200 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 --work_dir "$W/ppo" \
    --variant "trl-logprobs: --logprob_chunk_mib 0" --variant "chunks-again:" \
    --variant "chunks-4mib: --logprob_chunk_mib 4" -- $EAGER_FP32
  part logprobs_defaults 360 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 \
    --work_dir "$W/ppo" --variant "trl-logprobs: --logprob_chunk_mib 0" --variant "chunks-again:"
fi
