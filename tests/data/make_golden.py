#!/usr/bin/env python3
"""Makes the golden files of the model tests with an independent implementation: HF transformers + tokenizers
reading the same GGUF file (weights dequantized to fp32 by transformers' own GGUF loader).

    pip install torch transformers gguf accelerate
    HF_HUB_OFFLINE=1 python3 tests/data/make_golden.py      # from the repository root, after scripts/fetch-model.sh

Writes tests/data/tok_golden.txt and tests/data/logits_golden.txt (plain text, read by tests/test_model_golden.c).

Tokenizer note: transformers builds the tokenizer from the GGUF metadata but has no rule for
tokenizer.ggml.pre = "smollm", so it falls back to GPT-2's pre-tokenizer. SmolLM2's own tokenizer.json (and llama.cpp's
"smollm" rule) first splits every digit (HF `Digits(individual_digits=True)`) and then applies the GPT-2 byte-level
regex; we install that pre-tokenizer, so the reference is HF tokenizers with the model's real pre-tokenizer. The
id counts of both over the corpus are printed for the record (212507 vs 213634 with transformers 5.23).
"""
import gzip
import os
import struct
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "models")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = "/usr/share/debian-reference/debian-reference.en.txt.gz"
OUT = os.path.join(ROOT, "tests", "data")
BLOCK = 8192           # corpus checksum per block of this many ids, so a mismatch can be located
STRETCH = (100000, 2048)  # ids stored in full: start, count
LOGIT_POS = 320        # positions whose logits are stored
TOPK = 8

CASES = [
    "Hello world",
    "  leading spaces and trailing   ",
    "numbers 12345 and 3.14159, 1,000,000 and  42 and\t7",
    "don't I'll we've they're she'd it's O'Neil 'quoted' DON'T",
    "tabs\tand\nnew\n\nlines \n  \n\t x\r\n",
    "ünïcödé café naïve — “quotes” … ½ ² Ⅻ ٣ 中文字符 日本語 😀 emoji",
    "apt-get install -y --no-install-recommends build-essential && echo $HOME/.bashrc",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "x = [1, 2, 3]; y = {\"a\": 0x1F} // comment\n    return y;",
]


def fnv1a_ids(ids):
    h = 1469598103934665603
    for b in struct.pack("<%di" % len(ids), *ids):
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    text = gzip.open(CORPUS, "rb").read().decode("utf-8")
    gpt2_ids = tok(text, add_special_tokens=False).input_ids
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ids = tok(text, add_special_tokens=False).input_ids
    print(f"corpus: {len(text)} chars, {len(ids)} ids ({len(gpt2_ids)} with transformers' GPT-2 fallback)")

    with open(os.path.join(OUT, "tok_golden.txt"), "w") as f:
        f.write(f"# made by tests/data/make_golden.py: HF tokenizers on {CORPUS}\n")
        f.write(f"corpus {len(ids)} {fnv1a_ids(ids):016x}\n")
        for i in range(0, len(ids), BLOCK):
            blk = ids[i:i + BLOCK]
            f.write(f"block {i} {len(blk)} {fnv1a_ids(blk):016x}\n")
        s, n = STRETCH
        f.write(f"stretch {s} {n} " + " ".join(map(str, ids[s:s + n])) + "\n")
        for c in CASES:
            cid = tok(c, add_special_tokens=False).input_ids
            f.write(f"case {c.encode('utf-8').hex()} {len(cid)} " + " ".join(map(str, cid)) + "\n")
        chat = tok.apply_chat_template([{"role": "user", "content": "What is Debian?"}], tokenize=False,
                                       add_generation_prompt=True)
        cid = tok(chat, add_special_tokens=False).input_ids
        f.write(f"chat {'What is Debian?'.encode('utf-8').hex()} {len(cid)} " + " ".join(map(str, cid)) + "\n")

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, torch_dtype=torch.float32)
    model.eval()
    inp = torch.tensor([ids[:LOGIT_POS]])
    with torch.no_grad():
        logits = model(inp).logits[0].float()
    top = torch.topk(logits, TOPK, dim=-1)
    with open(os.path.join(OUT, "logits_golden.txt"), "w") as f:
        f.write(f"# made by tests/data/make_golden.py: transformers {__import__('transformers').__version__}, "
                f"fp32, {MODEL_FILE}, first {LOGIT_POS} ids of the corpus\n")
        f.write(f"positions {LOGIT_POS} topk {TOPK}\n")
        f.write("ids " + " ".join(map(str, ids[:LOGIT_POS])) + "\n")
        for p in range(LOGIT_POS):
            lse = torch.logsumexp(logits[p], dim=0).item()
            pairs = " ".join(f"{int(i)}:{v:.5f}" for i, v in zip(top.indices[p].tolist(), top.values[p].tolist()))
            f.write(f"{p} {lse:.5f} {pairs}\n")
    print("wrote", os.path.join(OUT, "tok_golden.txt"), os.path.join(OUT, "logits_golden.txt"))


if __name__ == "__main__":
    sys.exit(main())
