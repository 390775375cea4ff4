#!/usr/bin/env bash
# On a lent GPU machine (see ../shared/stack-notes.md): the current scripts against an older copy of them in
# BASELINE_DIR (default .old: `git archive <commit> ppo_gpt2_imdb.py dpo_llama2_stackexchange.py | tar -x -C .old`),
# measured in the same call, plus each lever against the current defaults. One call per group fits the 10-minute
# limit of a call:
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old ppo    # about 9 min
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old dpo    # about 8 min; carry the liger-kernel wheel
#                                                                    # (fetch-wheels.sh liger-kernel==0.8.5)
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old compile   # about 6 min: regional compilation, the
#                                                                       # cudagraphs backend, TRL's log-probabilities
# Each part runs on its own (a layout that fails gets a row saying why, and the rest still runs); a part that cannot
# finish before DEADLINE seconds (default 570) is skipped, not cut off. Timed rows come first, profiles last. Logs,
# the RESULTS.md rows and all profiles (in one file, profiles.txt: the device tool returns at most 8 files) land in
# $OUT after every part.
set -u
BASELINE=${1:-.old}
GROUP=${2:-}
if [[ $GROUP != ppo && $GROUP != dpo && $GROUP != compile ]]; then
  echo "usage: bash benchmarks/gpu_session.sh BASELINE_DIR ppo|dpo|compile   (one group per call)"
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
  # and later rows find what earlier ones compiled (kernels they share too), so the order matters:
  # - `static-cache-blocks-cudagraphs` first: the candidate defaults compiled one transformer block at a time
  #   (--compile_scope blocks; 3x faster to compile on 2 CPU cores). Its first update is what a user's first run
  #   pays, cold: the decode and the block graph.
  # - `static-cache-compile-cudagraphs`, the same compiled whole (H200, 2026-11-26, cold: 62.9 s first update, about
  #   40 s of it the PPO epochs' graph, 20 s the decode; the decode is warm here, so its first_optimisation_seconds
  #   is the epochs' compile, nearly cold).
  # - `...-bf16` adds bf16 autocast to it. Eager, autocast was slower at this size (launch-bound); under CUDA
  #   graphs launches no longer dominate and the epochs' matmuls may gain (a new epochs' graph, about 40 s).
  # - `static-cache-cudagraphs-backend` (before them: it finds nothing in the caches that the others fill, and the
  #   cold first update is what it is for) compiles the decode and the PPO epochs with torch.compile's cudagraphs
  #   backend: CUDA graphs of the eager kernels, traced in seconds, nothing generated or fused. Inductor's code
  #   generation is most of the 63 s cold first update above; at GPT-2's size the update is launch-bound, and CUDA
  #   graphs remove the launches whatever the kernels. The candidate for a cold pass under the old code's 119.8 s.
  # `trl-logprobs` (the script's chunked log-probabilities against TRL's row-by-row loop) moved to the compile
  # group, to make room.
  # Measured on 2026-11-26, and so left out here: the static cache alone, compiled epochs in default mode, alone and
  # with it, and compiled epochs with CUDA graphs alone. The timed rows take about 420 s. After them, the fastest
  # layout of that session runs once more, 3 updates, to profile update 3: its kernels ranked by GPU time, its
  # operations by CPU time, and the seconds the GPU was busy against the update's wall time (0.35 s steady, against
  # an estimated 0.1 s of GPU work: is the rest the host?). That run's first update is what a second run on one
  # machine pays (compile caches warm). `gpu_session.sh .old compile` times the two scopes apart, each with empty
  # caches.
  both="--static_cache_generation true --compile_ppo_epochs reduce-overhead"
  backend="--static_cache_generation true --compile_decode cudagraphs --compile_ppo_epochs cudagraphs"
  part ppo 540 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 --work_dir "$W/ppo" \
    --baseline "$BASELINE" --profile_step 3 --profile_layouts static-cache-compile-cudagraphs \
    --variant "static-cache-cudagraphs-backend: $backend" \
    --variant "static-cache-blocks-cudagraphs: $both --compile_scope blocks" \
    --variant "static-cache-compile-cudagraphs: $both" \
    --variant "static-cache-compile-cudagraphs-bf16: $both --bf16_autocast true"
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
  # The script's chunked log-probabilities (--logprob_chunk_mib 32, the default) against TRL's row-by-row loop.
  part trl_logprobs 90 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 --work_dir "$W/ppo" \
    --variant "trl-logprobs: --logprob_chunk_mib 0"
fi
