#!/usr/bin/env python3
"""Merges the rows of bench/quality.sh (kvq, llama.cpp, HF QuantizedCache) into one CSV and writes its tables.

  quality_table.py kvq-md CTX CHUNKS < kvq-table.txt > kvq.csv    kvq perplexity --compare's table -> rows (for a kvq
                                                                   without --csv: no KLD columns then)
  quality_table.py merge OUT.csv CSV...                           rows of each CSV, read by column name, in order
  quality_table.py hf OUT.csv bench-hf-quality.csv [CTX]          HF rows (method,nbits,...) -> rows; CTX for rows
                                                                   without a ctx column
  quality_table.py md CSV                                          the markdown tables, one per ctx, on stdout
  quality_table.py md2csv < quality.md > quality.csv              the tables back to rows (bench/quality.sh --csv)
"""
import csv
import re
import sys

COLS = ["method", "kv", "type_k", "type_v", "ctx", "chunks", "tokens", "ppl", "ppl_se", "dppl_pct", "kld_mean",
        "kld_p99", "top1_pct", "bits_per_element", "bytes_per_token", "f16_bytes_per_token", "seconds"]


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") if r.get(k) is not None else "" for k in COLS})


def kvq_md(ctx, chunks):
    """| q4 | 10.4035 +/- 0.2647 | +1.493% | 6480 | 0.281x | rows of kvq perplexity --compare (before --csv)"""
    rows, tokens = [], ""
    for line in sys.stdin:
        m = re.search(r"(\d+) scored tokens", line)
        if m:
            tokens = m.group(1)
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(c) < 5 or c[0].startswith("KV") or c[0].startswith("-"):
            continue
        ppl, se = [x.strip() for x in c[1].split("+/-")]
        kv = c[0]
        tk, _, tv = kv.split(":")[0].partition("/")
        b, ratio = float(c[3]), float(c[4].rstrip("x"))
        rows.append(dict(method="kvq", kv=kv, type_k=tk, type_v=tv or tk, ctx=ctx, chunks=chunks, ppl=ppl, ppl_se=se,
                         dppl_pct=c[2].rstrip("%").lstrip("+"), bytes_per_token=c[3],
                         f16_bytes_per_token=f"{b / ratio:.0f}", bits_per_element=f"{16 * ratio:.3f}"))
    for r in rows:
        r["tokens"] = tokens
    write("/dev/stdout", rows)


def hf(out, src, ctx):
    rows = []
    for r in read(src):
        m = r.get("method", "")
        low = m.lower()
        nb = r.get("nbits", "")
        if low.startswith("kvq-"):  # kvq's KVQCache on HF's protocol: one method, its config as the KV label
            name, kv = "HF kvq", low[4:].replace("/residual=", ":r")
        elif low == "dynamic":
            name, kv = "HF DynamicCache", "f16"
        else:
            name = "HF HQQ" if "hqq" in low else "HF quanto" if "quanto" in low else "HF " + m
            kv = f"int{nb}" if nb else m
        row = dict(r, method=name, kv=kv)
        row.setdefault("ctx", ctx)
        if not row.get("ctx"):
            row["ctx"] = ctx
        rows.append(row)
    write(out, rows)


def fmt(x, spec, suffix=""):
    try:
        return format(float(x), spec) + suffix
    except (TypeError, ValueError):
        return "-"


def md(path):
    rows = read(path)
    ctxs = sorted({int(r["ctx"]) for r in rows})
    for ctx in ctxs:
        sel = [r for r in rows if int(r["ctx"]) == ctx]
        print(f"### ctx {ctx}")
        print()
        print("| method    | KV               | bits/elem | PPL                  | ΔPPL      | KLD mean  | KLD p99   | top-1 %  |")
        print("|-----------|------------------|-----------|----------------------|-----------|-----------|-----------|----------|")
        for r in sel:
            se = fmt(r.get("ppl_se"), ".4f")
            ppl = fmt(r["ppl"], "8.4f") + (f" +/- {se:<7}" if se != "-" else " " * 12)
            print(f"| {r['method']:<9} | {r['kv']:<16} | {fmt(r['bits_per_element'], '9.3f')} | {ppl:<20} | "
                  f"{fmt(r['dppl_pct'], '+8.3f', '%'):>9} | {fmt(r.get('kld_mean'), '9.5f'):>9} | "
                  f"{fmt(r.get('kld_p99'), '9.4f'):>9} | {fmt(r.get('top1_pct'), '7.2f'):>8} |")
        print()


def md2csv():
    rows, ctx = [], None
    for line in sys.stdin:
        m = re.match(r"### ctx (\d+)", line)
        if m:
            ctx = m.group(1)
            continue
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        if ctx is None or len(c) != 8 or c[0] in ("method", "") or c[0].startswith("-"):
            continue
        ppl, _, se = c[3].partition("+/-")
        val = lambda x: "" if x == "-" else x.rstrip("%").lstrip("+")  # noqa: E731
        rows.append(dict(method=c[0], kv=c[1], ctx=ctx, bits_per_element=val(c[2]), ppl=ppl.strip(),
                         ppl_se=se.strip(), dppl_pct=val(c[4]), kld_mean=val(c[5]), kld_p99=val(c[6]),
                         top1_pct=val(c[7])))
    write("/dev/stdout", rows)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "kvq-md":
        kvq_md(*args)
    elif cmd == "merge":
        order = {"kvq": 0, "llama.cpp": 1}  # then HF's; a stable sort keeps each method's rows in their order
        write(args[0], sorted((dict(r) for p in args[1:] for r in read(p)), key=lambda r: order.get(r["method"], 2)))
    elif cmd == "hf":
        hf(args[0], args[1], args[2] if len(args) > 2 else "2048")
    elif cmd == "md":
        md(args[0])
    elif cmd == "md2csv":
        md2csv()
    else:
        sys.exit(__doc__)
