#!/usr/bin/env bash
# Installs libtorch 2.11.0 (from the PyPI wheel torch==2.11.0) into a project venv and links it
# at .libtorch, which .cargo/config.toml points tch at. Idempotent; about 2 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, numpy; assert torch.__version__.split("+")[0] == "2.11.0"' 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.11.0 numpy
fi
# The CCCL headers (libcu++'s nv/target) that the wheel's CUDA runtime headers include: needed to
# compile the NCCL process group (csrc/dist.cpp); headers only, ~4 MB, the runtime's major.minor.
# Optional: without them the build uses Gloo alone.
CUDA_RT=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("nvidia-cuda-runtime"))' 2>/dev/null || true)
if [ -n "$CUDA_RT" ] && ! .venv/bin/python -c 'import importlib.metadata as m; m.version("nvidia-cuda-cccl")' 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps "nvidia-cuda-cccl==${CUDA_RT%.*}.*" \
    || echo "cccl headers: not installed (pip failed); building without NCCL (Gloo only)"
fi
TORCH_DIR=$(.venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$TORCH_DIR" .libtorch
echo "libtorch: $(readlink .libtorch)"
# The Gloo headers for data-parallel training (csrc/dist.cpp; the wheel ships Gloo inside
# libtorch_cpu but not its headers). Optional: without them the build leaves data parallelism out.
if [ ! -f /usr/include/gloo/config.h ] && [ -z "${GLOO_INCLUDE:-}" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null \
    && { $SUDO apt-get install -y -q libgloo-dev >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libgloo-dev >/dev/null 2>&1; }; }; then
    echo "gloo headers: /usr/include/gloo (libgloo-dev)"
  else
    echo "gloo headers: not installed (apt-get install libgloo-dev failed or is unavailable); building without data parallelism"
  fi
fi
