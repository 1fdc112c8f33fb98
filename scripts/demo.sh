#!/usr/bin/env bash
# The main job on a fresh machine: set up, fetch the models, ingest the sample
# help-centre collection, start the API (our engine in-process, embedded Chroma)
# and the Streamlit UI on 127.0.0.1, and print the URL. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
RAGLOOM_SKIP_VLLM=${RAGLOOM_SKIP_VLLM:-1} bash scripts/setup.sh   # the demo needs no vLLM
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RL=.venv/bin/ragloom
API_PORT=${RAGLOOM_DEMO_API_PORT:-8000}
UI_PORT=${RAGLOOM_DEMO_UI_PORT:-8501}
COLLECTION=${RAGLOOM_DEMO_COLLECTION:-helpcentre}

# Single-user local demo: auth off, which the server allows on loopback only.
export RAGLOOM_API__AUTH=off
export RAGLOOM_UI__API_URL="http://127.0.0.1:$API_PORT"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

echo "[demo] starting the API on http://127.0.0.1:$API_PORT (engine: SmolLM2-135M int4, in-process;"
echo "[demo]   the first start builds its compiled decode step in the background, ~2x faster after)"
$RL serve --host 127.0.0.1 --port "$API_PORT" &
pids+=($!)
for _ in $(seq 1 180); do
  curl -fsS "http://127.0.0.1:$API_PORT/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$API_PORT/health" >/dev/null || { echo "[demo] the API did not start" >&2; exit 1; }

echo "[demo] uploading docs/samples/helpcentre into collection '$COLLECTION' through the API"
.venv/bin/python - "$API_PORT" "$COLLECTION" <<'PY'
import sys
import time
from pathlib import Path

import httpx

port, collection = sys.argv[1], sys.argv[2]
api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
created = api.post("/api/collections", json={"name": collection})
if created.status_code not in (201, 409):
    sys.exit(f"[demo] could not create the collection: {created.text}")
files = [("files", (p.name, p.read_bytes())) for p in sorted(Path("docs/samples/helpcentre").glob("*.md"))]
job = api.post(f"/api/collections/{collection}/documents", files=files).raise_for_status().json()
while job["status"] in ("queued", "running"):
    time.sleep(1)
    job = api.get(f"/api/jobs/{job['id']}").raise_for_status().json()
print(f"[demo] ingestion {job['status']}: {job['processed_files']}/{job['total_files']} files")
PY

echo "[demo] starting the UI"
$RL ui --host 127.0.0.1 --port "$UI_PORT" &
pids+=($!)
for _ in $(seq 1 60); do
  curl -fsS "http://127.0.0.1:$UI_PORT/_stcore/health" >/dev/null 2>&1 && break
  sleep 1
done
echo
echo "  ragloom is ready: open http://127.0.0.1:$UI_PORT  (collection '$COLLECTION'; Ctrl-C stops)"
echo
wait
