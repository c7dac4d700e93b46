#!/usr/bin/env bash
# The H200 benchmark, run through the `device` tool from the repo root, with .whl and .devshared carried:
#   .whl        ../shared/tools/device-wheels.sh trl
#   .devshared  copies of ../shared/{bench,models} and data/alpaca1k_guanaco_text.jsonl
# Writes one JSON line per run to $OUT/results.jsonl, logs and profiles beside it.
#   usage: bash examples/benchmarks/h200.sh [RUNS...]   (RUNS: names of the run_* functions below; default all)
set -u
. examples/benchmarks/_device_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off (KINDS.md)
ours() {  # label, then --set overrides
  local label=$1; shift
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  timeout -k 15 ${LIMIT:-170} python3 -m phi3tune.bench /tmp/base.yaml --steps $STEPS --warmup $WARM --label "$label" \
    "${sets[@]}" > "/tmp/log_$label.txt" 2>&1 || { echo "run $label failed: $?"; tail -c 3000 "/tmp/log_$label.txt" >> "$OUT/failures.txt"; }
  grep -h '^{' "/tmp/log_$label.txt" >> "$OUT/all.jsonl"; tail -c 700 "/tmp/log_$label.txt"; echo
}
run_quickstart() { ours quickstart; }  # the README quickstart as written: optimize_for="auto", unpacked, 4 x 4
run_quickstart_packed() { ours quickstart_packed data.packing=true; }
run_seq2048() { ours seq2048 data.packing=true data.max_seq_length=2048; }
run_seq4096() { ours seq4096 data.packing=true data.max_seq_length=4096; }
run_balanced() { ours balanced training.optimize_for=balanced; }
run_speed() { ours speed training.optimize_for=speed; }
run_speed_packed() { ours speed_packed training.optimize_for=speed data.packing=true; }
run_speed_packed_flex() { ours speed_packed_flex training.optimize_for=speed data.packing=true attn_implementation=flex_attention; }
run_speed_16x1() { ours speed_16x1 training.optimize_for=speed training.batch_size=16 training.grad_accum=1; }
run_memory_packed() { ours memory_packed training.optimize_for=memory data.packing=true training.optimizer=paged_adamw_8bit; }
run_speed_mb4096() { ours speed_mb4096 training.optimize_for=speed data.packing=true training.batch_size=16 training.grad_accum=1 training.micro_batch_tokens=4096; }
run_speed_compile() { ours speed_compile training.optimize_for=speed data.packing=true training.compile=true; }
run_memory_mb8192() { ours memory_mb8192 training.optimize_for=memory data.packing=true training.optimizer=paged_adamw_8bit training.batch_size=16 training.grad_accum=1; }
run_speed_seq4096() { ours speed_seq4096 training.optimize_for=speed data.packing=true data.max_seq_length=4096 training.batch_size=1 training.grad_accum=4; }
run_memory_seq4096() { ours memory_seq4096 training.optimize_for=memory data.packing=true data.max_seq_length=4096 training.batch_size=1 training.grad_accum=4 training.optimizer=paged_adamw_8bit; }
run_speed_c4096() { ours speed_c4096 training.optimize_for=speed data.packing=true training.batch_size=16 training.grad_accum=1; }
run_memory_c8192() { ours memory_c8192 training.optimize_for=memory data.packing=true training.optimizer=paged_adamw_8bit training.batch_size=16 training.grad_accum=1; }
run_memory_c2048() { ours memory_c2048 training.optimize_for=memory data.packing=true training.optimizer=paged_adamw_8bit; }
run_speed_unpacked_c() { ours speed_unpacked_c training.optimize_for=speed training.batch_size=16 training.grad_accum=1; }
multi() {  # label, nproc, then --set overrides: one process per GPU through torchrun
  local label=$1 n=$2; shift 2
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  timeout -k 15 ${LIMIT:-170} python3 -m torch.distributed.run --nproc_per_node $n -m phi3tune.bench /tmp/base.yaml \
    --steps $STEPS --warmup $WARM --label "$label" "${sets[@]}" > "/tmp/log_$label.txt" 2>&1 \
    || { echo "run $label failed: $?"; tail -c 3000 "/tmp/log_$label.txt" >> "$OUT/failures.txt"; }
  grep -h '^{' "/tmp/log_$label.txt" >> "$OUT/all.jsonl"; grep -h '^{' "/tmp/log_$label.txt" | cut -c1-900; echo
}
run_ddp2_auto() { multi ddp2_auto 2 data.packing=true; }  # quickstart_packed (optimize_for="auto") on 2 GPUs
run_ddp2() { multi ddp2 2 training.optimize_for=speed data.packing=true training.batch_size=16 training.grad_accum=1; }
# DDP's gradient buckets (PHI3TUNE_DDP, benchmarks only; torch's default: 25 MB buckets, gradients copied into them)
DDP_SETS=(training.optimize_for=speed data.packing=true training.batch_size=16 training.grad_accum=1)
run_ddp2_b100() { PHI3TUNE_DDP=bucket_cap_mb=100 multi ddp2_b100 2 "${DDP_SETS[@]}"; }
run_ddp2_b400() { PHI3TUNE_DDP=bucket_cap_mb=400 multi ddp2_b400 2 "${DDP_SETS[@]}"; }
run_ddp2_view() { PHI3TUNE_DDP=gradient_as_bucket_view=1 multi ddp2_view 2 "${DDP_SETS[@]}"; }
run_ddp2_nobcast() { PHI3TUNE_DDP=broadcast_buffers=0 multi ddp2_nobcast 2 "${DDP_SETS[@]}"; }  # buffers not re-sent
run_ddp2_noflat() { PHI3TUNE_FLAT_STEP=0 multi ddp2_noflat 2 "${DDP_SETS[@]}"; }  # per-tensor optimizer steps
run_speed_c4096_noflat() { PHI3TUNE_FLAT_STEP=0 ours speed_c4096_noflat "${DDP_SETS[@]}"; }
run_ddp2_b100_view() { PHI3TUNE_DDP=bucket_cap_mb=100,gradient_as_bucket_view=1 multi ddp2_b100_view 2 "${DDP_SETS[@]}"; }
# FSDP-QLoRA with the defaults (paged AdamW stepping each rank's shards; compiled layers: the gathered 4-bit weights
# keep their quant state, distributed.keep_quant_state_on_gathered_weights), and with eager layers asked for
FSDP_SETS=(training.optimize_for=speed data.packing=true training.batch_size=16 training.grad_accum=1
           training.distributed=fsdp quant.quant_storage=bfloat16)
run_fsdp2() { multi fsdp2 2 "${FSDP_SETS[@]}"; }
run_fsdp2_eager() { multi fsdp2_eager 2 "${FSDP_SETS[@]}" training.compile=false; }
# Phi-3-medium's real shape (14B, examples/benchmarks/configs/phi3-medium-4k-instruct) with random weights, on
# emulated 8 GiB cards (as_card.py): two under FSDP (the base is loaded on the CPU, each GPU gets its shards), and
# one, which phi3tune refuses before loading weights (its 4-bit weights alone exceed the card)
medium() {
  [ -f /tmp/phi3m/config.json ] || python3 .devshared/bench/make_random_phi3.py --out /tmp/phi3m \
    --config examples/benchmarks/configs/phi3-medium-4k-instruct 2>&1 | tail -1
}
# double quantization: what a user short of memory sets (-0.17 GiB per GPU: the absmax in 8 bits)
MEDIUM_SETS=(model=/tmp/phi3m quant.quant_storage=bfloat16 quant.double_quant=true adapter.r=16 data.packing=true
             data.max_seq_length=1024
             training.optimize_for=memory training.micro_batch_tokens=1024 training.batch_size=4 training.grad_accum=1)
on_cards() {  # label, processes, then --set overrides: like multi, each rank on an emulated 8 GiB card
  local label=$1 n=$2; shift 2
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-16}  # the base is quantized on the CPU: torchrun would give each rank 1
  timeout ${LIMIT:-500} python3 -m torch.distributed.run --nproc_per_node $n .devshared/bench/as_card.py 8 \
    -m phi3tune.bench /tmp/base.yaml --steps $STEPS --warmup $WARM --label "$label" "${sets[@]}" \
    > "/tmp/log_$label.txt" 2>&1 || { echo "run $label failed: $?"; tail -c 3000 "/tmp/log_$label.txt" >> "$OUT/failures.txt"; }
  grep -h '^{' "/tmp/log_$label.txt" >> "$OUT/all.jsonl"; grep -h -E '^\{|as_card|Error' "/tmp/log_$label.txt" | cut -c1-900; echo
}
run_fsdp_medium_2x8() { medium; on_cards fsdp_medium_2x8 2 "${MEDIUM_SETS[@]}" training.distributed=fsdp; }
run_medium_1x8() { medium; on_cards medium_1x8 1 "${MEDIUM_SETS[@]}"; }
run_fsdp_medium_2x8_expand() {  # the same with the allocator's expandable segments (less reserved-but-unused memory)
  medium; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True on_cards fsdp_medium_2x8_expand 2 "${MEDIUM_SETS[@]}" \
    training.distributed=fsdp; }
# Resume under FSDP: an unbroken run, and the same run killed with kill -9 (torchrun and both ranks) once
# checkpoint-4 is complete, then resumed; prints the largest difference between the two final adapters
tree_pids() {  # a process and every process below it (read from /proc: no procps needed)
  local p; echo "$1"
  for p in $(grep -l "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3); do tree_pids "$p"; done
}
run_fsdp_resume() {
  local sets=(); for s in "${FSDP_SETS[@]}" training.max_steps=8 training.save_strategy=steps training.save_steps=2 \
    training.logging_steps=1 training.progress_bar=false; do sets+=(--set "$s"); done
  local train=(python3 -m torch.distributed.run --nproc_per_node 2 -m phi3tune train /tmp/base.yaml "${sets[@]}")
  rm -rf /tmp/resume_full /tmp/resume_kill
  timeout ${LIMIT:-300} "${train[@]}" --set training.output_dir=/tmp/resume_full > /tmp/log_resume_full.txt 2>&1 \
    || { echo "unbroken run failed"; tail -c 3000 /tmp/log_resume_full.txt; }
  # kill -9 of torchrun and every process under it, found through the process tree: a process-group kill missed
  # twice on the device machine (setsid forked under its job control; then `set -m` made no group of its own), the
  # run went on to its end and the "resume" started from its final checkpoint (2026-11-30, x2 calls)
  "${train[@]}" --set training.output_dir=/tmp/resume_kill > /tmp/log_resume_kill.txt 2>&1 &
  local job=$! waited=0
  until [ -f /tmp/resume_kill/checkpoint-4/trainer_state.json ] || [ $waited -gt $((5 * ${LIMIT:-300})) ]; do
    sleep 0.2; waited=$((waited + 1)); done
  kill -9 $(tree_pids $job) 2>/dev/null; wait $job 2>/dev/null
  echo "killed after: $(ls /tmp/resume_kill | tr '\n' ' ')"
  [ -d /tmp/resume_kill/final_checkpoint ] && echo "the kill missed: the run finished" | tee -a "$OUT/failures.txt"
  timeout ${LIMIT:-300} "${train[@]}" --set training.output_dir=/tmp/resume_kill --resume > /tmp/log_resume.txt 2>&1 \
    || { echo "resume failed"; tail -c 3000 /tmp/log_resume.txt; }
  python3 examples/benchmarks/compare_adapters.py /tmp/resume_full /tmp/resume_kill | tee -a "$OUT/all.jsonl"
}
# One rank fails after step 1 (rank_fault.py) on NCCL: does the other raise our TrainingError, and how soon?
fault() {  # label, dies|hangs, then env assignments
  local label=$1 mode=$2; shift 2
  [ -f /tmp/phi3tiny/config.json ] || python3 .devshared/bench/make_random_phi3.py --tiny --out /tmp/phi3tiny 2>&1 | tail -1
  local t0=$SECONDS
  env "$@" timeout 240 \
    python3 -m torch.distributed.run --nproc_per_node 2 examples/benchmarks/rank_fault.py /tmp/phi3tiny $DATA \
    /tmp/fault_$label $mode 30 > /tmp/log_fault_$label.txt 2>&1; local rc=$?
  echo "{\"label\": \"fault_$label\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0)), \"rank0\": $(cat /tmp/fault_$label.rank0.json 2>/dev/null || echo null)}" \
    | tee -a "$OUT/all.jsonl"; grep -v "^\s*$" /tmp/log_fault_$label.txt | grep -iE "error|nccl|watchdog|signal|rank" | tail -8 | cut -c1-300
}
run_fault_dies() { fault dies dies; }
run_fault_hangs() { fault hangs hangs; }
phi4() {  # Phi-4-mini's real shape (200,064 vocab, tied, partial RoPE) with random weights; no tokenizer ships,
  # so Phi-3's (its ids fit the vocabulary; the output head is 200,064 wide either way)
  [ -f /tmp/phi4/config.json ] || { python3 .devshared/bench/make_random_phi3.py --out /tmp/phi4 \
    --config .devshared/models/phi4-mini-instruct 2>&1 | tail -1; cp .devshared/models/phi3-mini-4k-instruct/tokenizer* \
    .devshared/models/phi3-mini-4k-instruct/chat_template.jinja /tmp/phi4/; }
}
# Chunked CE on Phi-4-mini: 8,192-token micro-batches through the 200k-wide head, chunked (2,048 tokens, recomputed
# in backward) vs not (PHI3TUNE_CE_CHUNK above the micro-batch: the whole logits tensor at once)
PHI4_SETS=(model=/tmp/phi4 training.optimize_for=speed data.packing=true training.batch_size=16 training.grad_accum=1
           training.micro_batch_tokens=8192)
run_phi4_ce() { phi4; ours phi4_ce "${PHI4_SETS[@]}"; }
run_phi4_noce() { phi4; PHI3TUNE_CE_CHUNK=1000000 ours phi4_noce "${PHI4_SETS[@]}"; }
run_trl() {
  timeout 200 python3 .devshared/bench/seed_recipe_trl.py --model /tmp/phi3 --data $DATA --steps $STEPS --warmup $WARM \
    --out /tmp/trl.json > /tmp/log_trl.txt 2>&1 || echo "trl failed"; cat /tmp/trl.json >> "$OUT/all.jsonl"; tail -c 400 /tmp/trl.json; echo
}
run_profile_quickstart() {
  timeout 170 python3 examples/benchmarks/profile_steps.py /tmp/base.yaml --start 4 --out "$OUT/profile_quickstart.txt" \
    > /tmp/log_profile_q.txt 2>&1 || { echo "profile failed"; tail -c 2000 /tmp/log_profile_q.txt; }
  head -45 "$OUT/profile_quickstart.txt"
}
run_profile_ddp2() {  # DDP's step on 2 GPUs next to one GPU's, same workload (speed_c4096 / ddp2); no --start:
  # torchrun reads it as an abbreviation of its own --start-method
  local sets=(); for s in "${DDP_SETS[@]}"; do sets+=(--set "$s"); done
  timeout 200 python3 -m torch.distributed.run --nproc_per_node 2 examples/benchmarks/profile_steps.py /tmp/base.yaml \
    "${sets[@]}" --out "$OUT/profile_ddp2.txt" > /tmp/log_profile_ddp2.txt 2>&1 || tail -c 2000 /tmp/log_profile_ddp2.txt
  timeout 170 python3 examples/benchmarks/profile_steps.py /tmp/base.yaml "${sets[@]}" \
    --out "$OUT/profile_1gpu.txt" > /tmp/log_profile_1gpu.txt 2>&1 || tail -c 2000 /tmp/log_profile_1gpu.txt
  head -12 "$OUT/profile_ddp2.txt.rank0" "$OUT/profile_1gpu.txt" 2>/dev/null | cut -c1-250
}
run_profile() {
  timeout 170 python3 examples/benchmarks/profile_steps.py /tmp/base.yaml --set training.optimize_for=speed \
    --set data.packing=true --out "$OUT/profile_speed_packed.txt" > /tmp/log_profile.txt 2>&1 || echo "profile failed"
  head -30 "$OUT/profile_speed_packed.txt"
}
runs=("$@"); [ ${#runs[@]} -gt 0 ] || runs=(speed_packed speed balanced speed_packed_flex memory_packed trl profile)
for r in "${runs[@]}"; do echo "=== $r $(date +%T)"; "run_$r"; done
