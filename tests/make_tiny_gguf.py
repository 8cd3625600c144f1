#!/usr/bin/env python3
"""Writes a tiny synthetic Llama GGUF (2 layers, dim 128, 2 heads of 64, 1 KV head, vocabulary of the 256 GPT-2 byte
symbols + a few merges + ChatML specials), F32 weights from a fixed seed. The engine, tokenizer and CLI load it like a
real model, in a few milliseconds and a few hundred allocations, so allocation-failure tests (tests/failalloc.cmake)
can fail every one of them in CI time. Standard library only.

usage: make_tiny_gguf.py OUT.gguf
"""
import random
import struct
import sys

DIM, N_HEADS, N_KV, HIDDEN, LAYERS, CTX = 128, 2, 1, 192, 2, 256
ALIGN = 32
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def byte_symbols():
    """GPT-2's byte -> unicode map (what byte-level BPE vocabularies spell tokens with)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocab():
    sym = byte_symbols()
    tokens = [sym[b] for b in range(256)]
    sp = sym[ord(" ")]
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), (sp, "w"), ("o", "r"), (sp + "w", "or"), ("l", "d"),
              (sp + "wor", "ld"), (sp, "t"), (sp + "t", "h"), ("i", "n"), (sp, "a")]
    for a, b in merges:
        tokens.append(a + b)
    types = [1] * len(tokens)
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tokens.append(s)
        types.append(3)  # control
    return tokens, types, [a + " " + b for a, b in merges]


def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    out = gguf_str(key) + struct.pack("<I", vtype)
    if vtype == STRING:
        return out + gguf_str(value)
    if vtype == U32:
        return out + struct.pack("<I", value)
    if vtype == F32:
        return out + struct.pack("<f", value)
    if vtype == BOOL:
        return out + struct.pack("<B", value)
    etype, items = value
    out += struct.pack("<IQ", etype, len(items))
    if etype == STRING:
        return out + b"".join(gguf_str(s) for s in items)
    return out + b"".join(struct.pack("<i", x) for x in items)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tokens, types, merges = vocab()
    V = len(tokens)
    meta = [
        kv("general.architecture", STRING, "llama"),
        kv("general.name", STRING, "kvq tiny test model"),
        kv("llama.context_length", U32, CTX),
        kv("llama.embedding_length", U32, DIM),
        kv("llama.block_count", U32, LAYERS),
        kv("llama.feed_forward_length", U32, HIDDEN),
        kv("llama.attention.head_count", U32, N_HEADS),
        kv("llama.attention.head_count_kv", U32, N_KV),
        kv("llama.rope.freq_base", F32, 10000.0),
        kv("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        kv("tokenizer.ggml.model", STRING, "gpt2"),
        kv("tokenizer.ggml.pre", STRING, "smollm"),
        kv("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        kv("tokenizer.ggml.token_type", ARRAY, (I32, types)),
        kv("tokenizer.ggml.merges", ARRAY, (STRING, merges)),
        kv("tokenizer.ggml.bos_token_id", U32, V - 3),
        kv("tokenizer.ggml.eos_token_id", U32, V - 3),
        kv("tokenizer.ggml.add_bos_token", BOOL, 0),
    ]
    kvd = DIM // N_HEADS * N_KV
    shapes = [("token_embd.weight", (DIM, V)), ("output_norm.weight", (DIM,))]
    for layer in range(LAYERS):
        p = "blk.%d." % layer
        shapes += [(p + "attn_norm.weight", (DIM,)), (p + "attn_q.weight", (DIM, DIM)), (p + "attn_k.weight", (DIM, kvd)),
                   (p + "attn_v.weight", (DIM, kvd)), (p + "attn_output.weight", (DIM, DIM)),
                   (p + "ffn_norm.weight", (DIM,)), (p + "ffn_gate.weight", (DIM, HIDDEN)),
                   (p + "ffn_up.weight", (DIM, HIDDEN)), (p + "ffn_down.weight", (HIDDEN, DIM))]
    rng = random.Random(1234)
    infos, blobs, off = [], [], 0
    for name, ne in shapes:
        n = 1
        for d in ne:
            n *= d
        if len(ne) == 1:  # norms: ones, as trained models have near them
            data = struct.pack("<%df" % n, *([1.0] * n))
        else:
            data = struct.pack("<%df" % n, *(rng.gauss(0.0, 0.08) for _ in range(n)))
        infos.append(gguf_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) +
                     struct.pack("<IQ", 0, off))  # ggml type 0 = F32
        pad = (-len(data)) % ALIGN
        blobs.append(data + b"\0" * pad)
        off += len(data) + pad
    head = b"GGUF" + struct.pack("<IQQ", 3, len(shapes), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * ((-len(head)) % ALIGN)
    with open(sys.argv[1], "wb") as f:
        f.write(head + b"".join(blobs))


if __name__ == "__main__":
    main()
