#!/usr/bin/env bash
# Single-GPU benchmark lists side by side, one per GPU of a multi-GPU machine (same host, same call: the peers'
# runs and ours meet the same machine), e.g. on nvidia-h200-x2:
#   bash examples/benchmarks/lanes.sh "cards.sh q@full q@12" "cards.sh u@12 u@16"
# A lane's leading VAR=value words set its environment ("STEPS=30 cards.sh q@12": 30 steps in that lane only).
# Lane i runs `bash examples/benchmarks/<its other words>` with CUDA_VISIBLE_DEVICES=i and OUT=$OUT/lane<i>; the set-up
# (wheels and the peers' wheels, the random Phi-3-mini checkpoint) runs once, first. Each lane's all.jsonl is
# appended to $OUT/all.jsonl.
set -u
. examples/benchmarks/_device_setup.sh
# the compiler's worker processes take every core by default: one lane's compile then slows the other lane's timed
# steps, whose host thread sets part of their pace; each lane gets a share, the rest stays free for the timed steps
[ $# -gt 1 ] && export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) * 3 / 8 / $# + 1 ))}
lanes=("$@"); i=0; pids=()
for lane in "${lanes[@]}"; do
  mkdir -p "$OUT/lane$i"
  read -r -a words <<< "$lane"; envs=()
  while [[ ${words[0]} == *=* ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  (env "${envs[@]}" CUDA_VISIBLE_DEVICES=$i OUT="$OUT/lane$i" bash "examples/benchmarks/${words[0]}" "${words[@]:1}" \
    > "$OUT/lane$i/stdout.txt" 2>&1) &
  pids+=($!); i=$((i + 1))
done
wait "${pids[@]}"
for j in $(seq 0 $((i - 1))); do
  echo "--- lane $j (GPU $j): ${lanes[$j]}"; cat "$OUT/lane$j/stdout.txt"; cat "$OUT/lane$j/all.jsonl" >> "$OUT/all.jsonl" 2>/dev/null
done
