# Sourced by the GPU benchmark scripts (h200.sh, cards.sh, lanes.sh), from the repo root on the device machine, with
# .whl and .devshared carried (.whl: ../shared/tools/device-wheels.sh [trl]; .devshared: copies of
# ../shared/{bench,models} and data/alpaca1k_guanaco_text.jsonl). Installs the wheels (and .whl-peers when carried),
# builds the Phi-3-mini-shaped random checkpoint once and writes /tmp/base.yaml: the README quickstart's settings on
# that model and the alpaca1k guanaco text.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${CPU_REHEARSAL:-0}" = 1 ]; then export PYTHONPATH=$PWD  # the CPU rehearsal: this venv's packages, no wheels
elif [ -f /tmp/site/.phi3tune-wheels ]; then export PYTHONPATH=/tmp/site:$PWD  # installed by an earlier script
else python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && touch /tmp/site/.phi3tune-wheels && export PYTHONPATH=/tmp/site:$PWD || exit 1; fi
# the peers' wheels (Unsloth, Liger: ../shared/bench/peers/fetch_wheels.sh), when carried; once per machine
if [ -d .whl-peers ] && [ "${CPU_REHEARSAL:-0}" != 1 ] && [ ! -f /tmp/site/.phi3tune-peers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl-peers/*.whl && touch /tmp/site/.phi3tune-peers
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch,transformers,peft,accelerate,bitsandbytes as b;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,b.__version__)" | tee -a "$OUT/gpu.txt"
python3 examples/benchmarks/host_link.py | tee -a "$OUT/gpu.txt"  # the host link's GB/s: machines differ there
python3 examples/benchmarks/host_speed.py | tee -a "$OUT/gpu.txt"  # the host CPU and its time to queue a CUDA op
[ -d /tmp/phi3 ] || python3 .devshared/bench/make_random_phi3.py --out /tmp/phi3 2>&1 | tail -1
DATA=.devshared/alpaca1k_guanaco_text.jsonl
cat > /tmp/base.yaml <<YAML
model: /tmp/phi3
quant: {bits: 4, quant_type: nf4, compute_dtype: auto, double_quant: false}
adapter: {r: 64, alpha: 16, dropout: 0.1, target_modules: auto}
data: {source: $DATA, max_seq_length: 512}
training: {batch_size: 4, grad_accum: 4, precision: bf16, learning_rate: 0.0002, seed: 0}
YAML
STEPS=${STEPS:-10}; WARM=${WARM:-3}
