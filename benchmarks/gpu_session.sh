#!/usr/bin/env bash
# One call on a lent GPU machine (see ../shared/stack-notes.md): the current scripts against an older copy of them
# in BASELINE_DIR (default .old: `git archive <commit> ppo_gpt2_imdb.py dpo_llama2_stackexchange.py | tar -x -C .old`),
# measured in the same run, plus the levers one by one (each against the current defaults: PPO's static cache and
# autocast off, DPO's Liger kernel on where installed; carry the liger-kernel wheel: fetch-wheels.sh liger-kernel==0.8.5). Each part runs on its own, so one failure does not cost
# the others; logs, JSON lines and the RESULTS.md rows land in $OUT.
#   source .whl/env.sh && bash benchmarks/gpu_session.sh .old
set -u
BASELINE=${1:-.old}
OUT=${OUT:-/tmp/gpu_session}
W=/tmp/bench_work
mkdir -p "$OUT" "$W/ppo" "$W/dpo"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - started)) s"
  grep '^{' "$OUT/$name.log" | python3 -c "import json,sys
for line in sys.stdin:
    row=json.loads(line); print('  ', row['settings'].get('layout', row['settings'].get('comparison')), row['figures'])"
  tail -n 3 "$OUT/$name.log" | grep -i -E "error|Traceback" | head -n 3
}
part ppo 150 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 --work_dir "$W/ppo" --baseline "$BASELINE"
part ppo_static_cache 50 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 12 --work_dir "$W/ppo" \
  --name static-cache -- --static_cache_generation true
part dpo 190 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 4 \
  --gradient_accumulation_steps 4 --work_dir "$W/dpo" --baseline "$BASELINE"
part dpo_batch1 60 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 1 \
  --work_dir "$W/dpo" --name batch-1
part dpo_16x1_no_checkpointing 75 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 1 \
  --gradient_accumulation_steps 16 --work_dir "$W/dpo" --name 16x1-no-checkpointing -- --gradient_checkpointing false
part dpo_no_liger 65 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 3 --batch_size 4 \
  --gradient_accumulation_steps 4 --work_dir "$W/dpo" --name no-liger -- --use_liger_kernel false
part dpo_spread_lengths 90 python3 benchmarks/bench_dpo.py --arch llama2-7b --device cuda --steps 5 --batch_size 4 \
  --gradient_accumulation_steps 4 --lengths spread --work_dir "$W/dpo_spread" --name spread-lengths
part ppo_autocast 40 python3 benchmarks/bench_ppo.py --arch gpt2 --device cuda --updates 4 --work_dir "$W/ppo" \
  --name autocast -- --bf16_autocast true
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
