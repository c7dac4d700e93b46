#!/usr/bin/env bash
# Card by card: the README quickstart as written (optimize_for="auto", no flag) on emulated 8-141 GiB cards, and the
# peers (Unsloth) on the same emulated card, in one device call. A card is emulated with ../shared/bench/as_card.py:
# a filler tensor takes the rest of the H200, so `auto` sees that card and a plan that needs more runs out of memory.
#
#   bash examples/benchmarks/cards.sh RUN...    (from the repo root on the device; carry .whl .whl-peers .devshared)
#
# A RUN is KIND@GIB[+VARIANT[+VARIANT...]], GIB a card size or "full" (the whole H200):
#   q   README quickstart, unpacked              p   the same with data.packing=true
#   attn  FlexAttention's document mask against torch's variable-length flash attention, one layer's fwd+bwd
#         (attention_kernels.py; GIB ignored)
#   twins  compiled_layers' torch-ops dequantization against bitsandbytes' CUDA kernel, every 4-bit weight
#         (GIB ignored)
#   deq   the compiled dequantization's ways against bitsandbytes' kernel, timed (dequant_kernels.py; GIB ignored;
#         DEQ_WAYS="bitsandbytes table kernel ..." times only those)
#   hash  LoRA dropout's masks hashed in int32 against int64: the same bits (eager, compiled) and each one's time
#         (dropout_hash.py; GIB ignored)
#   saved  what one compiled layer saves for backward at each budget (1.0, 0.6, 0.5, 0.3), fixed / symbolic lengths
#         (saved_tensors.py; GIB ignored; ~8 compiles: give it LIMIT=300); saved@full+deq: its base dequantized once
#   prof  torch.profiler table of the quickstart's steps 5-6 (profile_steps.py) on that card, with any of q's
#         variants (prof@16+mb2048, prof@full+amb5, ...; +packed: data.packing=true) and two of its own: +light (GPU
#         kernels only, the host near its own speed, and where the GPU waits in the step) and +trace (a gzipped
#         Chrome trace of the profiled steps beside the table, to read the streams' timeline); variants combine:
#         prof@full+packed+light, prof@8+mem+packed+light
#   mem   what is alive at the allocator's peak of MEM_STEPS (4) steps of the quickstart on that card, summed by
#         the frame that allocated it, for the whole run and for the steps after the first alone (with their
#         reserved and inactive-split peaks) (memory_peak.py; takes q's variants, +packed for packed rows), e.g.
#         mem@5: where a streamed plan's reservation goes once the model has loaded
#   u   Unsloth's fast path (packing, no checkpointing)   ug  Unsloth with its offloaded checkpointing
#   trl  the classic TRL recipe (../shared/bench/seed_recipe_trl.py: padded rows, SFTTrainer), the reference point
#   uprof  Unsloth's fast path with two steps after WARM profiled (peer_profile.py: its GPU's busy share and kernel
#         time by kind, as prof@'s head gives ours; 3 timed steps, so the run is short)
#   VARIANT (diagnosis): adamw (training.optimizer=adamw_torch), nopage / paged (bitsandbytes' AdamW32bit /
#   PagedAdamW32bit by class name: the default's math with its state in the caching allocator / in managed memory that
#   pages out when the card fills, as the default's), mb1024 / mb2048
#   (training.micro_batch_tokens), ceN (N tokens per output-head chunk, PHI3TUNE_CE_CHUNK; the plan predicts with it),
#   expand (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; every CUDA plan's default since session 5), ro / cpp
#   (compiled layers with CUDA graphs / a C++ kernel wrapper: PHI3TUNE_COMPILE, knobs.compile_settings), combo
#   (inductor's combo kernels: independent kernels of a layer share one launch, fewer launches for the host), late /
#   now (each step's loss and gradient norm read one step late, the host never waiting at a step's end / read at
#   once: PHI3TUNE_READ_LATE=1 / 0, late_read.py), opaque
#   (bitsandbytes' 4-bit ops left as Python calls in the compiled layers, as before compiled_layers.py), sel (each 4-bit
#   code's value selected by its bits, not loaded from a table: PHI3TUNE_COMPILE=dequant=select), kern (one Triton
#   kernel per weight, dequant_kernel.py: PHI3TUNE_COMPILE=dequant=kernel; slaunch: launched by inductor's
#   own launcher), gb (dynamo's graph breaks and recompiles logged: TORCH_LOGS=graph_breaks,recompiles; a mem@
#   run's go to logs.txt), noflat (the optimizer stepping each tensor,
#   as before flat_steps.py), nodrop (adapter.dropout=0), hash64 (LoRA dropout's masks hashed in int64, the same bits,
#   as before session 22: PHI3TUNE_DROPOUT_HASH=int64), outscale (PEFT's LoRA scale left on the adapter's output,
#   as before session 39, not applied by the hashed dropout: PHI3TUNE_COMPILE=lora_scale=output), amb5 / nodrop-amb5 (the partitioner's activation budget 0.5
#   instead of the plan's: PHI3TUNE_COMPILE=activation_budget=0.5; right with dropout since lora_dropout.py's hashed
#   masks; ambfull: the default budget 1.0, e.g. seq4096+ambfull against the memory plan's 0.3), noexpand (the allocator
#   without expandable segments, as before session 5), dyn / nodyn (every multiple of 128 tokens from one
#   symbolic-length graph / the 4 fixed lengths, whatever auto takes: PHI3TUNE_COMPILE=dynamic_lengths=1 / 0), lenN (N
#   fixed lengths fitted to the data, not 4), off / nooff (checkpointed layers' inputs in host memory, offload.py:
#   PHI3TUNE_OFFLOAD=1 for any plan that checkpoints every layer, so `auto` may pick one, e.g. 8 GiB: 8,192 tokens, all
#   32 checkpointed; 0 never; the memory plan's default on CUDA is on), offlN (the first N layers' activations in host
#   memory instead of checkpointing, on every speed plan that would checkpoint: PHI3TUNE_OFFLOAD_LAYERS=N; offl0:
#   never, the plans before session 20), tckpt (checkpointed layers by torch.utils.checkpoint around the compiled
#   layer, as before session 23, not inside its graphs: PHI3TUNE_RECOMPUTE_IN_GRAPH=0), nobylen (every pass checkpoints the longest micro-batch's layers, the
#   plans before session 21: PHI3TUNE_CKPT_BY_LENGTH=0; by default a speed plan that checkpoints does so by
#   micro-batch length, checkpoint_lengths.py), nocombo (no combo kernels), seq4096-nooff (seq4096 without it), seq4096-amb3
#   (seq4096 with the compiler's low activation budget: the recomputed layer keeps less), masks (the partitioner
#   recomputes the hashed LoRA dropout masks in backward instead of saving them, and the plan predicts without them:
#   PHI3TUNE_COMPILE=masks=recompute, knobs.RECOMPUTE_MASKS), deq0 / deq1 (the 4-bit base never / always dequantized
#   once for the run, dequantized.py: PHI3TUNE_DEQUANTIZE; by default the plan dequantizes it where it fits), deqlN
#   (only the first N decoder layers dequantized once, the rest 4-bit: PHI3TUNE_DEQUANTIZE_LAYERS=N), bal
#   (optimize_for=balanced: the plain path, padded batches and eager layers, the losses' reference), vl / flex
#   (attention: torch's varlen flash kernel, varlen_attention.py / FlexAttention's document mask), lt (matmuls through
#   cuBLASLt, not torch's default cuBLAS: the host pays ~31 µs per aten::mm, profiled), mem (optimize_for=memory),
#   seq4096 (memory plan at max_seq_length 4096, batch 1 x 4), stream (the 4-bit base's packed bytes in pinned host
#   memory, a decoder layer streamed in ahead of its use, two on the device: PHI3TUNE_STREAM_BASE=1, streamed_base.py;
#   auto's choice on small cards since session 26), resident (the base never streamed: PHI3TUNE_STREAM_BASE=0), ckall
#   (every layer checkpointed on every pass: training.gradient_checkpointing=true; with off, e.g.
#   q@8+stream+off+ckall+mb4096+ce512: the least a speed plan holds, its inputs in host memory beside a streamed base),
#   nopin (micro-batches left in pageable host memory, whose copies may wait for the device: PHI3TUNE_PIN_BATCHES=0, as
#   before session 28), nostacks (mem@ runs: memory_peak.py without stack traces, which fail under the memory plan),
#   resN (a streamed base keeps N decoder layers' packed bytes on the device, spread evenly, and streams the rest:
#   PHI3TUNE_STREAM_RESIDENT=N, streamed_base.resident_layers), rec (moved inputs freed under
#   record_stream on the copy's stream, as before session 28: PHI3TUNE_OFFLOAD_RELEASE=record_stream), heldN (the
#   compute stream waits for a moved input's copy N saves later, not offload.HELD_SAVES: PHI3TUNE_HELD_SAVES=N),
#   aheadN (backward keeps N moved inputs on their way back, not one: PHI3TUNE_OFFLOAD_AHEAD=N), tailN (where every
#   saved tensor moves, a forward's last saves worth N hidden vectors a token stay on the device, not
#   memory.OFFLOAD_TAIL_HIDDENS; tail0: all move, as before session 31: PHI3TUNE_OFFLOAD_TAIL=N), slotsN (a streamed
#   base's N device slots, N - 1 layers on their way in: PHI3TUNE_STREAM_SLOTS=N)
# One JSON line per run goes to $OUT/all.jsonl (tokens/s, allocator / reserved / device peaks, predicted peak,
# allocator retries, step times); failures to $OUT/failures.txt.
set -u
. examples/benchmarks/_device_setup.sh
LIMIT=${LIMIT:-180}
# Unsloth's runs get their own limit: its first step compiles, 53 s on session 21's third machine, whose 120 s limit
# cut the run after 8 of 33 steps
PEER_LIMIT=${PEER_LIMIT:-$(( LIMIT > 180 ? LIMIT : 180 ))}

# the memory plan at max_seq_length 4096, batch 1 x 4 (the seq4096* variants)
SEQ4096=(--set training.optimize_for=memory --set data.max_seq_length=4096 --set training.batch_size=1)

card_prefix() { [ "$1" = full ] && echo "" || echo ".devshared/bench/as_card.py $1"; }

summary() {  # FILE KEY...: those keys of each JSON line of FILE, one dict a line
  python3 -c "import json,sys
for l in open(sys.argv[1]):
    if l.startswith('{'): d=json.loads(l); print({k: d.get(k) for k in sys.argv[2:]})" "$@"
}

variant_args() {  # variant (variants joined by "+" combine, e.g. mb2048+ro): adds to the caller's sets (config
  # overrides), envs and mp (memory_peak.py's options), bash's arrays being dynamically scoped; 1 on an unknown one
  local v vs=() compile=()
  IFS=+ read -r -a vs <<< "$1"
  for v in "${vs[@]}"; do case "$v" in
    adamw) sets+=(--set training.optimizer=adamw_torch) ;;
    nopage) sets+=(--set training.optimizer=AdamW32bit) ;;
    paged) sets+=(--set training.optimizer=PagedAdamW32bit) ;;
    mb*) sets+=(--set "training.micro_batch_tokens=${v#mb}") ;;
    ce*) envs+=("PHI3TUNE_CE_CHUNK=${v#ce}") ;;
    expand) envs+=(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) ;;
    noexpand) envs+=(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False) ;;
    ro) compile+=(mode=reduce-overhead); envs+=(TORCH_LOGS=perf_hints) ;;  # perf_hints: why a graph is skipped
    cpp) compile+=(cpp_wrapper=1) ;;
    combo) compile+=(combo_kernels=1) ;;
    nocombo) compile+=(combo_kernels=0) ;;
    blocking) envs+=(CUDA_LAUNCH_BLOCKING=1) ;;  # each kernel waits: where a device fault really happens
    gb) envs+=(TORCH_LOGS=graph_breaks,recompiles) ;;  # dynamo's graph breaks and recompiles in the run's log
    late) envs+=(PHI3TUNE_READ_LATE=1) ;;
    now) envs+=(PHI3TUNE_READ_LATE=0) ;;
    opaque) compile+=(opaque_4bit=1) ;;
    sel) compile+=(dequant=select) ;;
    kern) compile+=(dequant=kernel) ;;
    slaunch) envs+=(TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1) ;;  # kern's kernel launched by inductor's
    #   own launcher, not Triton's Python one (kern+slaunch; session 35 measured it with a block kernel, commit 356990a)
    masks) compile+=(masks=recompute) ;;
    noflat) envs+=(PHI3TUNE_FLAT_STEP=0) ;;
    dyn) compile+=(dynamic_lengths=1) ;;
    nodyn) compile+=(dynamic_lengths=0) ;;
    lt) envs+=(TORCH_BLAS_PREFER_CUBLASLT=1) ;;
    len*) compile+=("lengths=${v#len}") ;;
    nodrop) sets+=(--set adapter.dropout=0) ;;
    hash64) envs+=(PHI3TUNE_DROPOUT_HASH=int64) ;;  # the masks hashed in int64 (the same bits), as before s22
    outscale) compile+=(lora_scale=output) ;;  # PEFT's LoRA scale on the adapter's output, as before session 39
    nodrop-amb*) sets+=(--set adapter.dropout=0); compile+=("activation_budget=0.${v#nodrop-amb}") ;;
    ambfull) compile+=(activation_budget=1.0) ;;  # the compiler's default budget, e.g. seq4096+ambfull
    amb*) compile+=("activation_budget=0.${v#amb}") ;;
    mem) sets+=(--set training.optimize_for=memory) ;;
    deq0) envs+=(PHI3TUNE_DEQUANTIZE=0) ;;
    deq1) envs+=(PHI3TUNE_DEQUANTIZE=1) ;;
    deql*) envs+=("PHI3TUNE_DEQUANTIZE_LAYERS=${v#deql}") ;;
    offl*) envs+=("PHI3TUNE_OFFLOAD_LAYERS=${v#offl}") ;;
    nobylen) envs+=(PHI3TUNE_CKPT_BY_LENGTH=0) ;;
    tckpt) envs+=(PHI3TUNE_RECOMPUTE_IN_GRAPH=0) ;;
    off) envs+=(PHI3TUNE_OFFLOAD=1) ;;
    ckall) sets+=(--set training.gradient_checkpointing=true) ;;  # every layer checkpointed on every pass
    nooff) envs+=(PHI3TUNE_OFFLOAD=0) ;;
    stream) envs+=(PHI3TUNE_STREAM_BASE=1) ;;  # the 4-bit base streamed from host memory (streamed_base.py)
    resident) envs+=(PHI3TUNE_STREAM_BASE=0) ;;  # the base on the device, wherever auto would stream it
    seq4096-amb3) compile+=(activation_budget=0.3); sets+=("${SEQ4096[@]}") ;;
    seq4096-nooff) envs+=(PHI3TUNE_OFFLOAD=0); sets+=("${SEQ4096[@]}") ;;
    bal) sets+=(--set training.optimize_for=balanced) ;;
    vl) sets+=(--set attn_implementation=phi3tune_varlen) ;;
    flex) sets+=(--set attn_implementation=flex_attention) ;;
    seq4096) sets+=("${SEQ4096[@]}") ;;
    packed) sets+=(--set data.packing=true) ;;  # mem@GIB+packed (p@ runs are packed already)
    nostacks) mp+=(--stacks none) ;;  # mem@...: no stack traces (recording Python stacks fails under the memory plan)
    nopin) envs+=(PHI3TUNE_PIN_BATCHES=0) ;;  # pageable micro-batches, whose copies may wait for the device (< s28)
    res*) envs+=("PHI3TUNE_STREAM_RESIDENT=${v#res}") ;;  # a streamed base keeps N layers on the device
    rec) envs+=(PHI3TUNE_OFFLOAD_RELEASE=record_stream) ;;  # moved inputs freed under record_stream (< s28)
    held*) envs+=("PHI3TUNE_HELD_SAVES=${v#held}") ;;  # the compute stream waits for a moved input's copy N saves on
    ahead*) envs+=("PHI3TUNE_OFFLOAD_AHEAD=${v#ahead}") ;;  # backward keeps N moved inputs on their way back
    tail*) envs+=("PHI3TUNE_OFFLOAD_TAIL=${v#tail}") ;;  # a forward's last saves worth N hiddens a token stay
    slots*) envs+=("PHI3TUNE_STREAM_SLOTS=${v#slots}") ;;  # a streamed base's device slots (N - 1 layers coming in)
    *) echo "unknown variant $v"; return 1 ;;
  esac; done
  [ ${#compile[@]} -gt 0 ] && envs+=("PHI3TUNE_COMPILE=$(IFS=,; echo "${compile[*]}")")
  return 0
}

ours() {  # label gib variant
  local label=$1 gib=$2 sets=() envs=() mp=()
  case "$1" in p@*) sets+=(--set data.packing=true) ;; esac
  variant_args "$3" || return
  if [ "${label%%@*}" = mem ]; then  # what is alive at the allocator's peak, by allocating frame (memory_peak.py)
    local out="$OUT/mem_$(echo "${label#mem@}" | tr '+#' '__').txt"
    # shellcheck disable=SC2046
    env "${envs[@]}" timeout -k 15 "$LIMIT" python3 $(card_prefix "$gib") examples/benchmarks/memory_peak.py \
      /tmp/base.yaml --steps "${MEM_STEPS:-4}" --out "$out" "${mp[@]}" "${sets[@]}" > "/tmp/log_$label.txt" 2>&1 \
      || { echo "run $label failed: $?"; { echo "== $label"; tail -c 3000 "/tmp/log_$label.txt"; } >> "$OUT/failures.txt"; }
    { echo "== $label"; grep -i -A4 'graph break\|recompil' "/tmp/log_$label.txt" | head -80 | cut -c1-400
      grep -v '^{' "/tmp/log_$label.txt" | grep -iv 'it/s\]' | tail -30 | cut -c1-400; } >> "$OUT/logs.txt"
    head -32 "$out" 2>/dev/null | cut -c1-300
    return
  fi
  # shellcheck disable=SC2046
  env "${envs[@]}" timeout -k 15 "$LIMIT" python3 $(card_prefix "$gib") -m phi3tune.bench /tmp/base.yaml --steps "$STEPS" \
    --warmup "$WARM" --label "$label" "${sets[@]}" > "/tmp/log_$label.txt" 2>&1 \
    || { echo "run $label failed: $?"; { echo "== $label"; tail -c 3000 "/tmp/log_$label.txt"; } >> "$OUT/failures.txt"; }
  grep -h '^{' "/tmp/log_$label.txt" | sed "s/^{/{\"card\": \"$gib\", /" >> "$OUT/all.jsonl"
  grep -h 'plan:\|as_card' "/tmp/log_$label.txt" | cut -c1-400
  grep -ih 'cudagraph' "/tmp/log_$label.txt" | sort | uniq -c | head -8 | cut -c1-300
  { echo "== $label"; grep -v '^{' "/tmp/log_$label.txt" | grep -iv 'it/s\]' | tail -25 | cut -c1-300; } >> "$OUT/logs.txt"
  summary "/tmp/log_$label.txt" label real_tokens_per_s peak_alloc_gib peak_reserved_gib peak_device_gib \
    predicted_peak_gib alloc_retries median_step_s steps_peak_alloc_gib steps_peak_reserved_gib steps_peak_device_gib first_step_s
}

peer() {  # label gib gc
  local label=$1 gib=$2 gc=$3
  rm -f "/tmp/peer_$label.jsonl"  # a warm machine keeps /tmp: an earlier call's line would be counted again (s30)
  # peer_peak.py: the device's peak added to the recipe's line, sampled as phi3tune.bench samples ours
  # shellcheck disable=SC2046
  UNSLOTH_COMPILE_LOCATION=/tmp/ucc_$label timeout -k 15 "$PEER_LIMIT" python3 $(card_prefix "$gib") \
    examples/benchmarks/peer_peak.py "/tmp/peer_$label.jsonl" \
    .devshared/bench/peers/unsloth_recipe.py --model /tmp/phi3 --data "$DATA" --steps "$STEPS" --warmup "$WARM" \
    --packing --gc "$gc" --label "$label" --out "/tmp/peer_$label.jsonl" > "/tmp/log_$label.txt" 2>&1 \
    || { echo "run $label failed: $?"; { echo "== $label"; tail -c 3000 "/tmp/log_$label.txt"; } >> "$OUT/failures.txt"; }
  [ -f "/tmp/peer_$label.jsonl" ] && sed "s/^{/{\"card\": \"$gib\", /" "/tmp/peer_$label.jsonl" >> "$OUT/all.jsonl" \
    && summary "/tmp/peer_$label.jsonl" label real_tokens_per_s peak_alloc_gib peak_reserved_gib peak_device_gib \
      median_step_s
}

declare -A seen=()  # a RUN named again (A/B pairs in ABBA order: runs on one machine differ ~10%) is labelled RUN#2, ...
for r in "$@"; do
  seen[$r]=$(( ${seen[$r]:-0} + 1 )); label=$r; [ "${seen[$r]}" -gt 1 ] && label="$r#${seen[$r]}"
  echo "=== $label $(date +%T)"
  kind=${r%%@*}; rest=${r#*@}; gib=${rest%%+*}; variant=""; [ "$rest" != "$gib" ] && variant=${rest#*+}
  case "$kind" in
    q|p|mem) ours "$label" "$gib" "$variant" ;;
    u) peer "$label" "$gib" false ;;
    ug) peer "$label" "$gib" unsloth ;;
    uprof) pout="$OUT/profile_u_${gib}.txt"  # Unsloth's fast path, steps WARM+1 .. WARM+2 profiled (peer_profile.py)
           rm -f "/tmp/peer_$label.jsonl"
           # shellcheck disable=SC2046
           UNSLOTH_COMPILE_LOCATION=/tmp/ucc_$label timeout -k 15 "$PEER_LIMIT" python3 $(card_prefix "$gib") \
             examples/benchmarks/peer_profile.py "$pout" "$WARM" 2 \
             .devshared/bench/peers/unsloth_recipe.py --model /tmp/phi3 --data "$DATA" --steps 3 --warmup "$WARM" \
             --packing --gc false --label "$label" --out "/tmp/peer_$label.jsonl" > "/tmp/log_$label.txt" 2>&1 \
             || { echo "run $label failed: $?"; { echo "== $label"; tail -c 3000 "/tmp/log_$label.txt"; } >> "$OUT/failures.txt"; }
           head -16 "$pout" 2>/dev/null | cut -c1-200 ;;
    trl) rm -f "/tmp/trl_$label.jsonl"  # the classic TRL recipe (seed_recipe_trl.py, padded rows): the reference
         # shellcheck disable=SC2046
         timeout -k 15 "$PEER_LIMIT" python3 $(card_prefix "$gib") examples/benchmarks/peer_peak.py \
           "/tmp/trl_$label.jsonl" .devshared/bench/seed_recipe_trl.py --model /tmp/phi3 --data "$DATA" \
           --steps "$STEPS" --warmup "$WARM" --out "/tmp/trl_$label.jsonl" > "/tmp/log_$label.txt" 2>&1 \
           || { echo "run $label failed: $?"; { echo "== $label"; tail -c 3000 "/tmp/log_$label.txt"; } >> "$OUT/failures.txt"; }
         [ -f "/tmp/trl_$label.jsonl" ] && sed "s/^{/{\"card\": \"$gib\", \"label\": \"$label\", /" "/tmp/trl_$label.jsonl" \
           >> "$OUT/all.jsonl" && summary "/tmp/trl_$label.jsonl" real_tokens_per_s peak_alloc_gib peak_reserved_gib \
           peak_device_gib median_step_s pad_fraction ;;
    twins) python3 examples/benchmarks/check_twins.py /tmp/phi3 | tee -a "$OUT/all.jsonl" ;;
    # shellcheck disable=SC2086
    deq) timeout -k 15 "$LIMIT" python3 examples/benchmarks/dequant_kernels.py ${DEQ_WAYS:-} 2>&1 | grep '^{' \
           | tee -a "$OUT/all.jsonl" ;;
    hash) timeout -k 15 "$LIMIT" python3 examples/benchmarks/dropout_hash.py 2>&1 | grep '^{' | tee -a "$OUT/all.jsonl" ;;
    # shellcheck disable=SC2046
    saved) timeout -k 15 "$LIMIT" python3 examples/benchmarks/saved_tensors.py /tmp/phi3 \
             $([ "$variant" = deq ] && echo --dequantized) 2>&1 | grep '^{' | tee -a "$OUT/all.jsonl" | cut -c1-300 ;;
    attn) timeout -k 15 "$LIMIT" python3 examples/benchmarks/attention_kernels.py 2>&1 | tee -a "$OUT/attn.txt" | tail -5
          grep -h '^{' "$OUT/attn.txt" >> "$OUT/all.jsonl" ;;
    prof) sets=(); envs=(); mp=(); extra=(); rest=(); IFS=+ read -r -a pvs <<< "$variant"  # prof@full+packed+light
          for v in "${pvs[@]}"; do case "$v" in
            light) extra+=(--light) ;;
            trace) extra+=(--trace "$OUT/trace_${gib}_$(echo "$variant" | tr '+' '_').json.gz") ;;  # the timeline
            *) rest+=("$v") ;; esac; done
          variant_args "$(IFS=+; echo "${rest[*]}")" || continue  # the rest as q's variants
          pout="$OUT/profile_${gib}_$(echo "$variant" | tr '+' '_').txt"  # "+" in a name does not come back
          # shellcheck disable=SC2046
          env "${envs[@]}" timeout -k 15 "$LIMIT" python3 $(card_prefix "$gib") examples/benchmarks/profile_steps.py \
            /tmp/base.yaml --start 4 "${sets[@]}" "${extra[@]}" --out "$pout" > "/tmp/log_prof.txt" 2>&1 || {
            tail -c 2000 /tmp/log_prof.txt; { echo "== $label"; tail -c 6000 /tmp/log_prof.txt; } >> "$OUT/failures.txt"; }
          head -12 "$pout" 2>/dev/null | cut -c1-220; grep -A24 '^GPU idle' "$pout" 2>/dev/null | cut -c1-200 ;;
    *) echo "unknown run $r" ;;
  esac
done
