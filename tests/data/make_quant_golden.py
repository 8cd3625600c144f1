#!/usr/bin/env python3
"""Writes the golden GGUF of ctest model_gguf_quants (tests/test_gguf_quants.sh runs it at test time): for every
ggml weight type kvq reads, a tensor of that type and, under the same name + ".f32", its dequantization by the
`gguf` Python package (gguf.quants, numpy: an implementation independent of kvq's C). tests/test_gguf_quants.c
dequantizes each with gguf_tensor_to_f32 and the per-row function and requires equality bit for bit (gguf.h says why the arithmetic is exact).

The quantized bytes are random (every code, sub-scale and high-bit pattern occurs), except the fp16 scale fields,
which are set to finite values from 1e-7 (fp16 subnormals) to 10, of both signs: a NaN/Inf scale has no golden
value to compare. K-quant tensors are 2 rows of 2 super-blocks, legacy ones 3 rows of 5 blocks (odd counts, so a
row/block mix-up shows).

usage: python3 tests/data/make_quant_golden.py OUT.gguf   (gguf 0.19.0, what scripts/setup.sh installs)
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# byte offsets of the fp16 scale fields inside one block (ggml's block layouts)
FP16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def scales(rng, n):
    mag = 10.0 ** rng.uniform(-7, 1, n)
    return (mag * rng.choice([-1, 1], n)).astype(np.float16)


def main(out):
    rng = np.random.default_rng(22)
    w = GGUFWriter(out, "kvq-quant-golden")
    for t, fields in FP16_FIELDS.items():
        blk, nbytes = GGML_QUANT_SIZES[t]
        rows, nblk = (2, 2) if blk == 256 else (3, 5)
        raw = rng.integers(0, 256, (rows * nblk, nbytes), dtype=np.uint8)
        for off in fields:
            raw[:, off:off + 2] = scales(rng, rows * nblk).view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(rows, nblk * nbytes)
        name = t.name.lower()
        w.add_tensor(name, raw, raw_dtype=t)
        w.add_tensor(name + ".f32", dequantize(raw, t).astype(np.float32))
    # the float types: F16 with subnormals and both signs, BF16 from random fp32 (truncated), F32
    f16 = scales(rng, 3 * 40).reshape(3, 40)
    w.add_tensor("f16", f16, raw_dtype=T.F16)
    w.add_tensor("f16.f32", dequantize(f16.view(np.uint8), T.F16).astype(np.float32))
    bf = (rng.standard_normal((3, 40)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    w.add_tensor("bf16", bf.view(np.uint8).reshape(3, 80), raw_dtype=T.BF16)
    w.add_tensor("bf16.f32", dequantize(bf.view(np.uint8).reshape(3, 80), T.BF16).astype(np.float32))
    f32 = rng.standard_normal((3, 40)).astype(np.float32)
    w.add_tensor("f32", f32)
    w.add_tensor("f32.f32", f32.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1])
