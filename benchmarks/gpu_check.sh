#!/usr/bin/env bash
# wdjax's GPU speed checks in one command, ordered so that whatever the time allows answers the
# speed targets first (docs/speed.md). Each part runs under what is left of one deadline (default
# 570 s, inside a 10-minute limit on one command); speed.py and xla_flags.py write their rows
# after every job, so a part cut short still brings back what it measured.
#
#   bash benchmarks/gpu_check.sh [OUT] [SECONDS]      # OUT defaults to $OUT
#   PRESET=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/check 420   # a rehearsal on a CPU
#
# 1. the gpu-marked tests (the generators' bf16 products are honoured on this chip);
# 2. KD and WID, wdjax against torch.compile, 32k tokens per step: the ">= 1.25x torch.compile"
#    and "40% MFU" targets (speed_gpu_vs_compile.json);
# 3. every generator's wdjax step beside KD's in one run: the "<= 1.15x KD" target (speed_gpu_methods.json);
# 4. KD at 4k tokens per step, wdjax against the hand-written jax.jit step: the "library overhead
#    within 10%" target (speed_gpu_small.json);
# 5. KD against torch.compile with torch_ref computing its last layer at the pooled token only, as
#    wdjax does: the same FLOPs on both sides (speed_gpu_same_flops.json);
# 6. KD as it trains, with dropout 0.1, wdjax against torch.compile (speed_gpu_dropout.json), and
#    wdjax's with JAX's rbg PRNG for the dropout draws (speed_gpu_dropout_rbg.json);
# 7. the XLA_FLAGS sweep on the KD step, with whatever time is left (xla_flags_gpu.json).
# The tables are in check.log (speed.py --merge rebuilds them from the JSON): 8 files in all.
set -uo pipefail
out=${1:-${OUT:?give OUT or run under the device tool}}
deadline=$((SECONDS + ${2:-570}))
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
log="$out/check.log"
left() { echo $((deadline - SECONDS)); }
preset=${PRESET:-gpu} py=${PYTHON:-python}
if [[ $preset == gpu ]]; then sizes=(--batches 256); small=(--batches 32); variants=()
else sizes=(); small=(--batches 4); variants=(--variants "" xla_cpu_use_xnnpack=false); fi

part() {  # part NAME MIN_SECONDS COMMAND...: run COMMAND under the time left, if MIN_SECONDS are
  local name=$1 need=$2; shift 2
  if (($(left) < need)); then echo "== $name: skipped, $(left) s left" | tee -a "$log"; return; fi
  echo "== $name ($(left) s left)" | tee -a "$log"
  timeout --kill-after=5 "$(left)" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]}, $(left) s left" | tee -a "$log"
  rm -f "$out"/*.md  # already in the log
}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$log"
[[ $preset == gpu ]] && part "gpu tests" 60 "$py" -m pytest -q -n 0 -p no:cacheprovider -m gpu tests/test_generators.py
part "kd, wid vs torch.compile" 200 "$py" benchmarks/speed.py --preset "$preset" --methods kd wid "${sizes[@]}" \
  --impls wdjax torch-compile --budget-s 180 --no-plot --tag vs_compile --out "$out"
part "every method's step over kd" 100 "$py" benchmarks/speed.py --preset "$preset" \
  --methods kd ws gws wd opdf "${sizes[@]}" --impls wdjax --budget-s 110 --no-plot --tag methods --out "$out"
part "kd at 4k tokens vs hand-written jax.jit" 60 "$py" benchmarks/speed.py --preset "$preset" --methods kd \
  "${small[@]}" --impls wdjax jax-handwritten --no-plot --tag small --out "$out"
part "kd vs torch.compile, torch doing wdjax's FLOPs" 120 "$py" benchmarks/speed.py --preset "$preset" --methods kd \
  "${sizes[@]}" --impls wdjax torch-compile --torch-first-token --no-plot --tag same_flops --out "$out"
part "kd with dropout vs torch.compile" 90 "$py" benchmarks/speed.py --preset "$preset" --methods kd \
  "${sizes[@]}" --dropout 0.1 --impls wdjax torch-compile --no-plot --tag dropout --out "$out"
part "kd with dropout, rbg draws" 45 env JAX_DEFAULT_PRNG_IMPL=unsafe_rbg "$py" benchmarks/speed.py \
  --preset "$preset" --methods kd "${sizes[@]}" --dropout 0.1 --impls wdjax --no-plot --tag dropout_rbg --out "$out"
part "xla flags" 90 "$py" benchmarks/xla_flags.py --preset "$preset" "${variants[@]}" --budget-s $(($(left) - 80)) --out "$out"
