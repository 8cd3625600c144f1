#!/usr/bin/env bash
# Kept for old notes: the GGUF fuzzer is one target of scripts/fuzz.sh now (tests/fuzz.cmake builds it in build-fuzz).
#   scripts/fuzz-gguf.sh [SECONDS]   =   scripts/fuzz.sh gguf [SECONDS]
exec bash "$(dirname "$0")/fuzz.sh" gguf "${1:-600}"
