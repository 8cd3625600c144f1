#!/usr/bin/env python3
"""kvq bench --gpu (bench-e2e-gpu.csv) beside llama.cpp's llama-bench (llamacpp-bench-gpu.csv, from
bench/peers/llamacpp-bench-gpu.sh) on the same GGUF: decode tokens/s per depth, kvq's type next to llama.cpp's
nearest (f16 = f16, q8 = q8_0, q4 = q4_0; q2 has no llama.cpp KV peer), their ratio, and kvq's ratio to its own f16
beside the bound (W + d K_f16) / (W + d K_t).
usage: e2e_table.py KVQ_CSV LLAMACPP_CSV OUT.md"""
import csv
import sys

kvq_csv, lc_csv, out = sys.argv[1:4]
kvq = list(csv.DictReader(open(kvq_csv, newline="")))
peer = {}
for r in csv.DictReader(open(lc_csv, newline="")):
    if int(r.get("n_gen", 0) or 0) > 0:  # the tg rows
        peer[(r["type_k"], int(r["n_depth"]))] = float(r["avg_ts"])
PEER = {"f16": "f16", "q8": "q8_0", "q4": "q4_0"}
lines = ["| KV (kvq) | depth | kvq tok/s | llama.cpp KV | llama.cpp tok/s | kvq / llama.cpp | kvq vs its f16 | bound |",
         "|---|---:|---:|---|---:|---:|---:|---:|"]
for r in kvq:
    d, name = int(r["depth"]), r["kv"]
    p = PEER.get(name)
    lt = peer.get((p, d)) if p else None
    ours = float(r["decode_tok_s"])
    lines.append(f"| {name} | {d} | {ours:.1f} | {p or '-'} | {f'{lt:.1f}' if lt else '-'} | "
                 f"{f'{ours / lt:.2f}x' if lt else '-'} | {r['ratio_f16']}x | {r['bound']}x |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
