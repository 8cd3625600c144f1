#!/usr/bin/env python3
"""The tables of bench/peers/e2e-cpu.sh: kvq bench (CPU) beside llama.cpp's llama-bench on the same GGUF, per model
(one subdirectory of OUT_DIR each, holding bench-e2e-cpu.csv and llamacpp-bench-cpu.csv): decode tokens/s per KV type
and depth with the ratio kvq / llama.cpp (kvq's type beside llama.cpp's nearest: f16 = f16, q8 = q8_0, q4 = q4_0),
each engine's speed-up over its own f16, prefill tokens/s at depth 0, and issue 22's targets marked met or missed.
Several rounds of one (type, depth) are averaged (the spread is printed when there are several).
Writes OUT_DIR/bench-e2e-cpu.md, and OUT_DIR/bench-e2e-cpu.png when matplotlib is there.
usage: e2e_cpu_table.py OUT_DIR"""
import csv
import os
import statistics
import sys

PEER = {"f16": "f16", "q8": "q8_0", "q4": "q4_0"}
COLORS = {"f16": "#000000", "q8": "#1f77b4", "q4": "#2ca02c"}


def mean_spread(xs):
    m = statistics.fmean(xs)
    return m, (max(xs) - min(xs)) / m if len(xs) > 1 else 0.0


def load(d):
    kvq, lc, pre_k, pre_l, info = {}, {}, {}, {}, {}
    for r in csv.DictReader(open(os.path.join(d, "bench-e2e-cpu.csv"), newline="")):
        key = (r["kv"], int(r["depth"]))
        kvq.setdefault(key, []).append(float(r["decode_tok_s"]))
        pre_k.setdefault(r["kv"], []).append(float(r["prefill_tok_s"]))
        info[key] = r
    for r in csv.DictReader(open(os.path.join(d, "llamacpp-bench-cpu.csv"), newline="")):
        key = (r["type_k"], int(r["n_depth"]))
        if int(r["n_gen"] or 0) > 0:
            lc.setdefault(key, []).append(float(r["avg_ts"]))
        elif int(r["n_prompt"] or 0) > 0:
            pre_l.setdefault(key, []).append(float(r["avg_ts"]))
    return kvq, lc, pre_k, pre_l, info


def fmt_ts(m, s):
    return f"{m:.1f}" + (f" (±{100 * s / 2:.0f}%)" if s > 0.005 else "")


def main():
    out = sys.argv[1]
    names = sorted(n for n in os.listdir(out) if os.path.exists(os.path.join(out, n, "bench-e2e-cpu.csv")))
    md, targets, plot = [], [], {}
    for name in names:
        kvq, lc, pre_k, pre_l, info = load(os.path.join(out, name))
        types = [t for t in PEER if any(k[0] == t for k in kvq)]
        depths = sorted({k[1] for k in kvq})
        W = float(next(iter(info.values()))["weight_bytes"])
        md += [f"### {name}", "",
               f"kvq reads W = {W / 2**20:.1f} MiB of weights per token (its `weight_bytes`).", "",
               "| KV kvq / llama.cpp | depth | kvq tok/s | llama.cpp tok/s | kvq / llama.cpp | kvq vs its f16 "
               "| llama.cpp vs its f16 | kvq KV B/token | kvq read GB/s |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        f16k = {d: statistics.fmean(kvq[("f16", d)]) for d in depths if ("f16", d) in kvq}
        f16l = {d: statistics.fmean(lc[("f16", d)]) for d in depths if ("f16", d) in lc}
        ratio = {}
        for t in types:
            for d in depths:
                if (t, d) not in kvq:
                    continue
                km, ks = mean_spread(kvq[(t, d)])
                p = PEER[t]
                lm, ls = mean_spread(lc[(p, d)]) if (p, d) in lc else (None, 0)
                ratio[(t, d)] = km / lm if lm else None
                plot.setdefault(name, []).append((t, d, km, lm))
                r = info[(t, d)]
                md.append(f"| {t} / {p} | {d} | {fmt_ts(km, ks)} | {fmt_ts(lm, ls) if lm else '-'} | "
                          f"{f'{km / lm:.2f}x' if lm else '-'} | {f'{km / f16k[d]:.2f}x' if d in f16k else '-'} | "
                          f"{f'{lm / f16l[d]:.2f}x' if lm and d in f16l else '-'} | {float(r['kv_bytes_per_token']):.0f} | "
                          f"{float(r['read_gb_s']):.1f} |")
        md += ["", f"Prefill ({name}): tokens/s of one batch from an empty cache (kvq: `--prefill`, one timing; "
                   "llama.cpp: pp at depth 0, mean of the repetitions).", "",
               "| KV kvq / llama.cpp | kvq prefill tok/s | llama.cpp prefill tok/s | kvq / llama.cpp |", "|---|---:|---:|---:|"]
        for t in types:
            km = statistics.fmean(pre_k[t])
            lv = pre_l.get((PEER[t], 0))
            lm = statistics.fmean(lv) if lv else None
            md.append(f"| {t} / {PEER[t]} | {km:.0f} | {f'{lm:.0f}' if lm else '-'} | {f'{km / lm:.2f}x' if lm else '-'} |")
        md.append("")

        def tgt(what, got, need, strict=False):
            if got is None:
                targets.append(f"| {what} | {name} | not measured | - |")
                return
            ok = got > need if strict else got >= need
            targets.append(f"| {what} | {name} | {got:.2f}x | **{'met' if ok else 'missed'}** |")

        tgt("depth 0, f16 KV: kvq decode >= 0.8x llama.cpp", ratio.get(("f16", 0)), 0.8)
        tgt("depth 8k: kvq q8 >= 1.5x llama.cpp q8_0", ratio.get(("q8", 8192)), 1.5)
        tgt("depth 8k: kvq q4 >= 2x llama.cpp q4_0", ratio.get(("q4", 8192)), 2.0)
        q4 = kvq.get(("q4", 8192))
        lf = f16l.get(8192)
        tgt("depth 8k: kvq q4 faster than llama.cpp f16", statistics.fmean(q4) / lf if q4 and lf else None, 1.0, True)
        if 32768 in depths:  # Gemma 3's target: against kvq's own f16 (the column says kvq q4 / kvq f16 there)
            q4 = kvq.get(("q4", 32768))
            tgt("depth 32k: kvq q4 decode faster than kvq f16 (kvq q4 / kvq f16)",
                statistics.fmean(q4) / f16k[32768] if q4 and 32768 in f16k else None, 1.0, True)
    md = ["| target (issue 22) | model | kvq / llama.cpp | |", "|---|---|---:|---|"] + targets + [""] + md
    open(os.path.join(out, "bench-e2e-cpu.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("e2e_cpu_table.py: matplotlib is not installed: no PNG", file=sys.stderr)
        return 0
    fig, axes = plt.subplots(1, len(plot), figsize=(5.5 * len(plot), 4.4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], plot.items()):
        depths = sorted({p[1] for p in pts})
        pos = {d: i for i, d in enumerate(depths)}  # depth 0 has no place on a log axis: one slot per depth
        for t in PEER:
            ps = sorted((p for p in pts if p[0] == t), key=lambda p: p[1])
            if not ps:
                continue
            ax.plot([pos[p[1]] for p in ps], [p[2] for p in ps], marker="o", color=COLORS[t], label=f"kvq {t}")
            lp = [p for p in ps if p[3]]
            ax.plot([pos[p[1]] for p in lp], [p[3] for p in lp], marker="s", ls="--", color=COLORS[t],
                    label=f"llama.cpp {PEER[t]}")
        ax.set_xticks(range(len(depths)))
        ax.set_xticklabels([f"{d // 1024}k" if d >= 1024 else str(d) for d in depths])
        ax.set_xlabel("depth (tokens in the cache)")
        ax.set_ylabel("decode tokens/s (1 sequence, 2 threads)")
        ax.set_ylim(bottom=0)
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("kvq bench vs llama-bench on the CPU (same GGUF, -fa on, KV f16 / q8(_0) / q4(_0))", fontsize=11)
    fig.tight_layout()
    png = os.path.join(out, "bench-e2e-cpu.png")
    fig.savefig(png, dpi=110)
    print("wrote", png, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
