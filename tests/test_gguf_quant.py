#!/usr/bin/env python3
"""kvq's GGUF row quantizers (src/model/gguf_write.c: F16, Q8_0, Q4_0, what `kvq gen-model` writes) against the gguf
Python package's (gguf.quants, bit-exact with ggml's reference quantizers): every byte must match.
usage: test_gguf_quant.py TEST_GGUF_QUANT_BINARY   (exit 77: the gguf package is not installed)"""
import subprocess
import sys
import tempfile

try:
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants
except ImportError as e:
    print(f"SKIP: {e} (pip install gguf)")
    sys.exit(77)

with tempfile.TemporaryDirectory() as d:
    subprocess.run([sys.argv[1], d], check=True)
    x = np.fromfile(f"{d}/in.f32", dtype=np.float32).reshape(-1, 32)
    bad = 0
    for name, t in (("f16", T.F16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)):
        ours = np.fromfile(f"{d}/out.{name}", dtype=np.uint8)
        with np.errstate(all="ignore"):
            ref = np.asarray(quants.quantize(x, t)).view(np.uint8).reshape(-1)
        if ours.shape != ref.shape:
            print(f"FAIL {name}: {ours.size} bytes, gguf.quants gives {ref.size}")
            bad += 1
            continue
        diff = np.flatnonzero(ours != ref)
        if diff.size:
            bpb = ref.size // x.shape[0]
            blk = diff[0] // bpb
            print(f"FAIL {name}: {diff.size} bytes differ; first in block {blk}: input {x[blk].tolist()}\n"
                  f"  kvq  {ours[blk * bpb:(blk + 1) * bpb].tolist()}\n  gguf {ref[blk * bpb:(blk + 1) * bpb].tolist()}")
            bad += 1
        else:
            print(f"ok {name}: {ours.size} bytes identical to gguf.quants")
    sys.exit(1 if bad else 0)
