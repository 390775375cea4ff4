#!/usr/bin/env bash
# On a lent GPU machine (see ../shared/stack-notes.md): the current scripts against an older copy of them in
# BASELINE_DIR (default .old: `git archive <commit> ppo_gpt2_imdb.py dpo_llama2_stackexchange.py | tar -x -C .old`),
# measured in the same call, plus each lever against the current defaults. One call per group fits the 10-minute
# limit of a call:
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old ppo    # about 7 min
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old dpo    # about 8 min; carry the liger-kernel wheel
#                                                                    # (fetch-wheels.sh liger-kernel==0.8.5)
# Each part runs on its own (a layout that fails gets a row saying why, and the rest still runs); a part that cannot
# finish before DEADLINE seconds (default 570) is skipped, not cut off. Timed rows come first, profiles last. Logs,
# the RESULTS.md rows and all profiles (in one file, profiles.txt: the device tool returns at most 8 files) land in
# $OUT after every part.
set -u
BASELINE=${1:-.old}
GROUP=${2:-}
if [[ $GROUP != ppo && $GROUP != dpo ]]; then
  echo "usage: bash benchmarks/gpu_session.sh BASELINE_DIR ppo|dpo   (one group per call)"
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
# The layout of the defaults before the speed levers
EAGER_FP32="--static_cache_generation false --compile_ppo_epochs false --bf16_autocast false"
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
    row=json.loads(line); s=row['settings']; print('  ', s.get('layout', s.get('comparison')), row['figures'])"
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
  # launch-bound, and CUDA graphs remove the launches whatever the kernels. Measured before (H200, 2026-11-27, call
  # 3; the layouts since removed from the script are in git history, with their rows): the old code 0.681 s/update;
  # the defaults (static-cache decode, compiled PPO epochs under CUDA graphs, bf16 autocast), every cache empty,
  # 0.236 s (2.89x), first update 54.1 s, one pass 99.9 s against 132.9 s, 8.93 GiB; eager fp32 0.526 s. Profile of
  # the defaults' update 3: GPU busy 0.137 s of 0.294 s; 3,944 cudaLaunchKernel calls beside 23 graph replays, from
  # the eager code around the graphs (the rollout's reference, reward and value passes in fp32, sampling,
  # advantages): the next lever.
  # The order: the defaults first after the old code, so their first update is what a user's first run pays, cold;
  # the eager fp32 layout; TRL's one-GPU example layout (the target: 1.5x its samples/s). Then the defaults
  # once more, 3 updates, to profile update 3.
  part ppo 480 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 --work_dir "$W/ppo" \
    --baseline "$BASELINE" --profile_step 3 --profile_layouts script-defaults --compare_trl_example \
    --variant "eager-fp32: $EAGER_FP32"
fi

if [[ $GROUP == dpo ]]; then
  # Llama-2-7B shapes in NF4 + LoRA at length 1024; the defaults use Liger's fused loss where it is installed
  # (measured in an earlier session: 4.90 -> 3.92 s/step). The spread-length set (lengths like real pairs, real
  # non-pad tokens/s) measures Liger's share again, against the defaults in the same call.
  part dpo 180 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 4 \
    --gradient_accumulation_steps 4 --work_dir "$W/dpo" --baseline "$BASELINE"
  part dpo_spread_lengths 260 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 5 --batch_size 4 \
    --gradient_accumulation_steps 4 --lengths spread --work_dir "$W/dpo_spread" --baseline "$BASELINE" \
    --name spread-lengths --variant "no-liger: --use_liger_kernel false"
  part dpo_batch1 70 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 1 \
    --work_dir "$W/dpo" --name batch-1
fi
