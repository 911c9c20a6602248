#!/usr/bin/env bash
# Create .venv-llmcompressor in the repository root: the peer library for
# benchmarks/bench_pruning.py, in its own environment because its pins
# (transformers<=5.17) conflict with the main one.
#
# torch is installed first with an exact pin so that the resolver keeps the CPU
# build instead of pulling a multi-GB CUDA wheel when llmcompressor is added.
# Usage: bash benchmarks/peers/setup_llmcompressor.sh [PYTHON]   (default: python3)
# On a machine whose default index serves CUDA torch wheels, get the CPU build with
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash benchmarks/peers/setup_llmcompressor.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$repo_root/.venv-llmcompressor"
python_bin="${1:-python3}"

TORCH_VERSION="2.13.0"
# 0.14.0.1 accepts torch 2.10-2.14 and transformers 5.15-5.17; checked with
# `pip download --no-deps llmcompressor==0.14.0.1` before pinning.
LLMCOMPRESSOR_VERSION="0.14.0.1"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llmcompressor" 2>/dev/null; then
    echo "already set up: $venv (llmcompressor $("$venv/bin/python" -c 'import llmcompressor; print(llmcompressor.__version__)'))"
    exit 0
fi

index_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    index_args=(--extra-index-url "$TORCH_INDEX_URL")
fi

"$python_bin" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install "torch==$TORCH_VERSION" "${index_args[@]}"
"$venv/bin/python" -m pip install "torch==$TORCH_VERSION" "llmcompressor==$LLMCOMPRESSOR_VERSION" \
    "${index_args[@]}"

# The resolver must not have swapped torch for a CUDA build.
"$venv/bin/python" - <<'PY'
import torch, transformers, llmcompressor
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"llmcompressor {llmcompressor.__version__}")
PY
echo "ready: $venv"
