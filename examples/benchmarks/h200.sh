#!/usr/bin/env bash
# The H200 benchmark, run through the `device` tool from the repo root, with .whl and .devshared carried:
#   .whl        ../shared/tools/device-wheels.sh trl
#   .devshared  copies of ../shared/{bench,models} and data/alpaca1k_guanaco_text.jsonl
# Writes one JSON line per run to $OUT/results.jsonl, logs and profiles beside it.
#   usage: bash examples/benchmarks/h200.sh [RUNS...]   (RUNS: names of the run_* functions below; default all)
set -u
. examples/benchmarks/_device_setup.sh
ours() {  # label, then --set overrides
  local label=$1; shift
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  timeout ${LIMIT:-170} python3 -m phi3tune.bench /tmp/base.yaml --steps $STEPS --warmup $WARM --label "$label" \
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
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  timeout ${LIMIT:-170} python3 -m torch.distributed.run --nproc_per_node $n -m phi3tune.bench /tmp/base.yaml \
    --steps $STEPS --warmup $WARM --label "$label" "${sets[@]}" > "/tmp/log_$label.txt" 2>&1 \
    || { echo "run $label failed: $?"; tail -c 3000 "/tmp/log_$label.txt" >> "$OUT/failures.txt"; }
  grep -h '^{' "/tmp/log_$label.txt" >> "$OUT/all.jsonl"; grep -h '^{' "/tmp/log_$label.txt" | cut -c1-900; echo
}
run_ddp2() { multi ddp2 2 training.optimize_for=speed data.packing=true training.batch_size=16 training.grad_accum=1; }
run_fsdp2() { multi fsdp2 2 training.optimize_for=speed data.packing=true training.compile=false training.distributed=fsdp quant.quant_storage=bfloat16; }
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
run_profile() {
  timeout 170 python3 examples/benchmarks/profile_steps.py /tmp/base.yaml --set training.optimize_for=speed \
    --set data.packing=true --out "$OUT/profile_speed_packed.txt" > /tmp/log_profile.txt 2>&1 || echo "profile failed"
  head -30 "$OUT/profile_speed_packed.txt"
}
runs=("$@"); [ ${#runs[@]} -gt 0 ] || runs=(speed_packed speed balanced speed_packed_flex memory_packed trl profile)
for r in "${runs[@]}"; do echo "=== $r $(date +%T)"; "run_$r"; done
