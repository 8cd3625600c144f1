#!/usr/bin/env python3
"""Makes the golden files of the model tests with an independent implementation: HF transformers + tokenizers
reading the same GGUF file (weights dequantized to fp32 by transformers' own GGUF loader).

    pip install torch transformers gguf accelerate
    HF_HUB_OFFLINE=1 python3 tests/data/make_golden.py      # from the repository root, after scripts/fetch-model.sh
    HF_HUB_OFFLINE=1 python3 tests/data/make_golden.py --model gemma3   # after scripts/fetch-model.sh gemma3

Writes tests/data/tok_golden.txt and tests/data/logits_golden.txt (plain text, read by tests/test_model_golden.c),
and the "hf" line of tests/data/ppl_reference.txt: transformers' perplexity of tests/data/ppl_excerpt.txt (a 9 KB
stretch of the corpus) chunked the way `kvq perplexity` does it (read by tests/test_model_ppl.sh).
`--ppl` redoes only the perplexity line. The references of the quantized KV types (the "ref" lines) come from
tests/data/make_ppl_reference.py, an emulation of kvq's cache formats in numpy.

Tokenizer note: transformers builds the tokenizer from the GGUF metadata but has no rule for
tokenizer.ggml.pre = "smollm", so it falls back to GPT-2's pre-tokenizer. SmolLM2's own tokenizer.json (and llama.cpp's
"smollm" rule) first splits every digit (HF `Digits(individual_digits=True)`) and then applies the GPT-2 byte-level
regex; we install that pre-tokenizer, so the reference is HF tokenizers with the model's real pre-tokenizer. The
id counts of both over the corpus are printed for the record (212507 vs 213634 with transformers 5.23).

--model gemma3 (Gemma 3 270M, gemma-3-270m-q4_k_m.gguf) writes tok_golden_gemma3.txt, logits_golden_gemma3.txt and
ppl_reference_gemma3.txt instead. Its tokenizer is transformers' own from the GGUF, unchanged (a SentencePiece-style
BPE: merges rebuilt from the vocabulary in file order, byte fallback, control and user-defined tokens matched whole).
Gemma's file says add_bos_token, so the logits run on <bos> + the first ids of the corpus, and each perplexity chunk
starts with <bos> in place of its first id (what `kvq perplexity` does when the tokenizer adds BOS, as llama.cpp).
"""
import gzip
import os
import struct
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "models")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "--model" in sys.argv and sys.argv[sys.argv.index("--model") + 1] == "gemma3"
if GEMMA:
    MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
SUFFIX = "_gemma3" if GEMMA else ""
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
if GEMMA:  # Gemma's turn markers, user-defined tokens (newline and space runs, HTML tags), byte fallback
    CASES = CASES[:-2] + [CASES[-1],
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
        "<table><tr><td>x</td></tr></table>\n\n\n\n a  b   c    d\t\t\te \u2581 \u2581\u2581x",
        "\x01\x02\x7f \U0001f9ff\U0001fae8 \u0d9e \uffff \U000e0041 <unused0> <eos> <bos> [multimodal]",
        "    indented\n        code  \n", " ", "", "a", "\n"]


def fnv1a_ids(ids):
    h = 1469598103934665603
    for b in struct.pack("<%di" % len(ids), *ids):
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


PPL_CTX = 512
PPL_CHUNKS = (3, 1)  # normal, KVQ_TEST_QUICK
if GEMMA:  # past Gemma's 512-token sliding window, so that the local layers' window is exercised
    LOGIT_POS = 600     # prefill 450 (chunks of 64), then decode across position 512
    PPL_CTX = 1024
    PPL_CHUNKS = (2, 1)


def smollm_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def gemma_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)


def load_model():
    from transformers import AutoModelForCausalLM
    import torch
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32)
    model.eval()
    return model


def ppl_reference(tok, model):
    """Chunks of PPL_CTX ids, each from an empty cache, scoring its second half: as `kvq perplexity --ctx 512`."""
    import math
    import torch
    text = open(os.path.join(OUT, "ppl_excerpt.txt"), encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False).input_ids
    res = []
    for n_chunks in PPL_CHUNKS:
        nll = []
        for c in range(n_chunks):
            chunk = ids[c * PPL_CTX:(c + 1) * PPL_CTX]
            if GEMMA:
                chunk = [tok.bos_token_id] + chunk[1:]
            chunk = torch.tensor([chunk])
            with torch.no_grad():
                logp = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
            first = PPL_CTX // 2
            for j in range(first - 1, PPL_CTX - 1):
                nll.append(-logp[j, chunk[0, j + 1]].item())
        res.append(math.exp(sum(nll) / len(nll)))
    return len(ids), res


def write_ppl(tok, model):
    n_ids, (ppl, ppl_quick) = ppl_reference(tok, model)
    path = os.path.join(OUT, f"ppl_reference{SUFFIX}.txt")
    lines = [l for l in open(path).read().splitlines() if not l.startswith("hf ")] if os.path.exists(path) else []
    lines.append(f"hf {PPL_CTX} {PPL_CHUNKS[0]} {ppl:.4f} {PPL_CHUNKS[1]} {ppl_quick:.4f}")
    open(path, "w").write("\n".join(lines) + "\n")
    print(f"ppl excerpt: {n_ids} ids, transformers PPL {ppl:.4f} ({PPL_CHUNKS[0]} chunks), {ppl_quick:.4f} (1 chunk)")


def main():
    if "--ppl" in sys.argv:
        write_ppl(gemma_tokenizer() if GEMMA else smollm_tokenizer(), load_model())
        return 0
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    import torch

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    text = gzip.open(CORPUS, "rb").read().decode("utf-8")
    if GEMMA:
        ids = tok(text, add_special_tokens=False).input_ids
        print(f"corpus: {len(text)} chars, {len(ids)} ids")
    else:
        gpt2_ids = tok(text, add_special_tokens=False).input_ids
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        ids = tok(text, add_special_tokens=False).input_ids
        print(f"corpus: {len(text)} chars, {len(ids)} ids ({len(gpt2_ids)} with transformers' GPT-2 fallback)")

    with open(os.path.join(OUT, f"tok_golden{SUFFIX}.txt"), "w") as f:
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
        if GEMMA:  # the file has no chat template: Gemma's turn format, as tok_encode_chat writes it (no <bos>)
            chat = "<start_of_turn>user\nWhat is Debian?<end_of_turn>\n<start_of_turn>model\n"
        else:
            chat = tok.apply_chat_template([{"role": "user", "content": "What is Debian?"}], tokenize=False,
                                           add_generation_prompt=True)
        cid = tok(chat, add_special_tokens=False).input_ids
        f.write(f"chat {'What is Debian?'.encode('utf-8').hex()} {len(cid)} " + " ".join(map(str, cid)) + "\n")

    model = load_model()
    lids = ([tok.bos_token_id] + ids[:LOGIT_POS - 1]) if GEMMA else ids[:LOGIT_POS]
    inp = torch.tensor([lids])
    with torch.no_grad():
        logits = model(inp).logits[0].float()
    top = torch.topk(logits, TOPK, dim=-1)
    with open(os.path.join(OUT, f"logits_golden{SUFFIX}.txt"), "w") as f:
        f.write(f"# made by tests/data/make_golden.py: transformers {__import__('transformers').__version__}, "
                f"fp32, {MODEL_FILE}, first {LOGIT_POS} ids of the corpus\n")
        f.write(f"positions {LOGIT_POS} topk {TOPK}\n")
        f.write("ids " + " ".join(map(str, lids)) + "\n")
        for p in range(LOGIT_POS):
            lse = torch.logsumexp(logits[p], dim=0).item()
            pairs = " ".join(f"{int(i)}:{v:.5f}" for i, v in zip(top.indices[p].tolist(), top.values[p].tolist()))
            f.write(f"{p} {lse:.5f} {pairs}\n")
    print("wrote", os.path.join(OUT, f"tok_golden{SUFFIX}.txt"), os.path.join(OUT, f"logits_golden{SUFFIX}.txt"))
    write_ppl(tok, model)


if __name__ == "__main__":
    sys.exit(main())
