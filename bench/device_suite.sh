#!/usr/bin/env bash
# The accelerator figures of the README in one run on one device (about 5 minutes on an H100 or
# H200): the base (12L/768H) distillation step (NST, batch 256 or the largest that fits, bf16,
# the teacher's forward inside the step) and the base teacher step (batch 64 or the largest that
# fits, 384 video steps): step time, tokens/s, MFU against the device's bf16 peak, peak device
# memory and compile time, as one markdown table.
#
#   bash bench/device_suite.sh            # on the accelerator machine, from the repository root
#   bash bench/device_suite.sh --smoke    # tiny sizes in float32: checks the script anywhere
#
# It needs JAX for the device, flax, optax, orbax-checkpoint and ml-collections, but not
# TensorFlow: the steps run on random batches. Wheels of packages the machine lacks may sit in
# .whl/ (installed into /tmp/site first). Figures and logs go to $OUT (default: a new temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--smoke" ]; then
  distill=(--student_size=tiny --teacher_size=tiny --batch=8 --steps=2 --warmup_steps=1 --dtype=float32)
  teacher=(--size=tiny --batch=8 --steps=2 --warmup_steps=1 --dtype=float32)
else
  distill=(--student_size=base --teacher_size=base --batch=256 --fit_batch --steps=10 --warmup_steps=2 --dtype=bfloat16)
  teacher=(--size=base --batch=64 --video_steps=384 --fit_batch --steps=6 --warmup_steps=2 --dtype=bfloat16)
fi
"$python" bench/distill_step.py "${distill[@]}" 2>&1 | tee "$out/distill_step.log"
"$python" bench/teacher_step.py "${teacher[@]}" 2>&1 | tee "$out/teacher_step.log"
"$python" bench/device_table.py "$out/distill_step.log" "$out/teacher_step.log" | tee "$out/device_table.md"
