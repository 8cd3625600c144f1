#!/usr/bin/env python3
"""Draws the benchmark CSVs of a docs directory as PNGs next to them (matplotlib; numpy is not needed).

  bench-cpu.csv         -> bench-cpu.png          CPU decode time per step vs context, per KV type (F16 included),
                                                  and the speed-up over F16 (kvq-bench cpu)
  bench-cuda.csv        -> bench-cuda.png         GPU decode time per step and layer vs context, per type, with
  bench-cuda-mixed.csv  -> bench-cuda-mixed.png   torch SDPA (fp16) for reference; one panel per batch size
  quality.csv           -> quality.png            ΔPPL and KLD vs bits per element, per method (bench/quality.sh)
  bench-hf.csv          -> bench-hf.png           whole-model decode ms/step vs context, per cache (bench/bench_hf.py)
  bench-e2e-gpu.csv     -> bench-e2e-gpu.png      kvq bench: decode tokens/s vs depth per KV type, and the speed-up
  bench-e2e-cpu.csv     -> bench-e2e-cpu.png      over f16 beside its bound (W + d K_f16) / (W + d K_t)

  python3 bench/plot.py [--dir docs] [cpu] [cuda] [quality] [hf] [e2e]     (no name: every CSV that is there)

kvq-bench, bench/quality.sh and bench/bench_hf.py call it after writing their CSVs to an --out directory. Without
matplotlib it prints a note and exits 0: a benchmark's numbers do not depend on its plot.
"""
import argparse
import csv
import os
import sys

# one colour per KV type in every plot; F16 and the references in black/grey
COLORS = {"f16": "#000000", "bf16": "#7f7f7f", "q8": "#1f77b4", "fp8": "#17becf", "q4": "#2ca02c",
          "q2": "#d62728", "q3": "#b8860b", "q8/q4": "#9467bd", "f16/q4": "#8c564b", "q8/q2": "#e377c2", "q4/q2": "#ff7f0e",
          "q4/q8": "#bcbd22", "q4:r128": "#2ca02c"}


# the other caches of bench_hf.py, in colours no KV type uses
HF_COLORS = {"dynamic": "#000000", "icw-int8": "#8c564b", "quanto-q4": "#9467bd", "quanto-q2": "#e377c2"}


def marker(name):
    return "x" if name == "fp8" else "o"  # fp8 runs as fast as q8: a different marker keeps both visible


def color(name):
    for k in (name, name.replace("kvq-", "")):
        if k in COLORS:
            return COLORS[k]
    return None


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ctx_label(x, _pos=None):
    return f"{int(x) // 1024}k" if x >= 1024 else str(int(x))


def log2_ctx_axis(ax, ctxs):
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(ctxs)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(ctx_label))
    ax.set_xlabel("context (tokens)")
    ax.grid(True, which="major", alpha=0.3)


def plain_log_y(ax):
    """log y axis with plain numbers (20, 50, 100) instead of 2x10^1"""
    from matplotlib.ticker import FuncFormatter
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _p: f"{y:g}" if f"{y:.0e}"[0] in "25" else ""))
    ax.grid(True, which="both", axis="y", alpha=0.25)


def legend_right(fig, ax, title=None):
    """one legend for the figure, right of the panels, where it hides no line"""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, title=title, fontsize=9, loc="center left", bbox_to_anchor=(1.0, 0.5))


def series(rows, key, x, y, where=lambda r: True):
    """{key value: ([x...], [y...])} in the CSV's order of keys, sorted by x."""
    out = {}
    for r in rows:
        if where(r) and r.get(y) not in (None, ""):
            out.setdefault(r[key], []).append((float(r[x]), float(r[y])))
    return {k: tuple(zip(*sorted(v))) for k, v in out.items()}


def plot_cpu(plt, src, png):
    rows = read_csv(src)
    ctxs = {float(r["ctx"]) for r in rows}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for t, (xs, ys) in series(rows, "type", "ctx", "ms_per_step").items():
        a1.plot(xs, ys, marker=marker(t), color=color(t), label=t, lw=2.2 if t == "f16" else 1.5,
                ls="--" if t in ("f16", "bf16") else "-")
    plain_log_y(a1)
    a1.set_ylabel("ms per decode step (one layer)")
    a1.set_title("CPU decode attention time")
    for t, (xs, ys) in series(rows, "type", "ctx", "speedup_vs_f16").items():
        a2.plot(xs, ys, marker=marker(t), color=color(t), label=t, ls="--" if t in ("f16", "bf16") else "-")
    a2.set_ylabel("speed-up over F16 (same run)")
    a2.set_title("speed-up over F16")
    a2.set_ylim(bottom=0)
    for a in (a1, a2):
        log2_ctx_axis(a, ctxs)
    legend_right(fig, a2, "KV type")
    fig.suptitle("kvq-bench cpu: Llama-3-8B head shapes (32 q heads, 8 KV heads, D=128), batch 1", fontsize=11)
    return save(fig, png)


def plot_cuda(plt, src, png):
    rows = read_csv(src)
    name = os.path.splitext(os.path.basename(src))[0]
    batches = sorted({int(r["batch"]) for r in rows})
    ctxs = {float(r["ctx"]) for r in rows}
    fig, axes = plt.subplots(1, len(batches), figsize=(4.6 * len(batches), 4.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = lambda r, b=b: int(r["batch"]) == b  # noqa: E731
        sdpa = series(rows, "batch", "ctx", "sdpa_us", lambda r: sel(r) and float(r["sdpa_us"] or 0) > 0)
        for xs, ys in sdpa.values():
            ax.plot(xs, ys, "s:", color="#e6a800", lw=2.5, label="torch SDPA (fp16)")
        for t, (xs, ys) in series(rows, "type", "ctx", "us_per_step_layer", sel).items():
            ax.plot(xs, ys, marker=marker(t), color=color(t), label=t, lw=2.2 if t == "f16" else 1.5,
                    ls="--" if t in ("f16", "bf16") else "-")
        plain_log_y(ax)
        log2_ctx_axis(ax, ctxs)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("µs per decode step and layer")
    legend_right(fig, axes[0][-1], "KV type (K/V)")
    fig.suptitle(f"kvq-bench cuda ({name}): decode attention, Llama-3-8B head shapes, L2 flushed before each run",
                 fontsize=11)
    return save(fig, png)


# one colour and marker per method of bench/quality.sh
QUALITY_STYLE = {"kvq": ("#1f77b4", "o"), "llama.cpp": ("#ff7f0e", "s"), "HF quanto": ("#2ca02c", "^"),
                 "HF HQQ": ("#d62728", "D")}
DPPL_FLOOR = 0.01  # ΔPPL % at or below this (F16 itself, noise-level gains) is drawn on the floor of the log axis


def plot_quality(plt, src, png):
    """ΔPPL % and mean KLD against bits per element (log y), one line per method and ctx through its plain types
    (entries without '/' or ':'); K/V mixes and switches (q4:rot=none, q4_0:norot) are labelled markers."""
    rows = [r for r in read_csv(src) if r.get("bits_per_element")]
    ctxs = sorted({int(r["ctx"]) for r in rows})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5))
    for ci, ctx in enumerate(ctxs):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["method"] == method and int(r["ctx"]) == ctx]
            if not sel:
                continue
            c, m = QUALITY_STYLE.get(method, ("#7f7f7f", "v"))
            for ax, key, floor in ((a1, "dppl_pct", DPPL_FLOOR), (a2, "kld_mean", 1e-5)):
                pts = [(float(r["bits_per_element"]), max(float(r[key]), floor), r["kv"]) for r in sel
                       if r.get(key) not in (None, "") and not (key == "kld_mean" and float(r[key]) <= 0)]
                line = sorted(p for p in pts if "/" not in p[2] and ":" not in p[2])
                if line:
                    ax.plot([p[0] for p in line], [p[1] for p in line], marker=m, color=c, ls="-" if ci == 0 else "--",
                            mfc=None if ci == 0 else "none", label=f"{method}, ctx {ctx}")
                for x, y, kv in pts:
                    if "/" in kv or ":" in kv:
                        ax.plot([x], [y], m, color=c, mfc="none", ms=8)
                    if ci == 0 and kv not in ("f16",):
                        ax.annotate(kv, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5, color=c)
    for ax, lab in ((a1, f"ΔPPL vs the method's own F16 (%; <= {DPPL_FLOOR} drawn at {DPPL_FLOOR})"),
                    (a2, "mean KL divergence vs the method's own F16 (nats)")):
        plain_log_y(ax)
        ax.set_ylabel(lab)
        ax.set_xlabel("bits per stored K/V element (scales and mins included)")
        ax.set_xticks([2, 3, 4, 5, 6, 8, 10, 12, 16])
        ax.grid(True, which="major", axis="x", alpha=0.3)
    a1.set_title("perplexity increase")
    a2.set_title("KL divergence of the next-token distribution")
    legend_right(fig, a2, "method")
    fig.suptitle("bench/quality.sh: SmolLM2-135M (Q4_1 GGUF), Debian reference text; a/b = keys a, values b; "
                 "hollow markers: mixes and switches", fontsize=10)
    return save(fig, png)


def plot_hf(plt, src, png):
    rows = [r for r in read_csv(src) if r.get("ms_step")]
    batches = sorted({int(r["batch"]) for r in rows})
    ctxs = {float(r["ctx"]) for r in rows}
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for m, (xs, ys) in series(rows, "method", "ctx", "ms_step", lambda r, b=b: int(r["batch"]) == b).items():
            c = color(m) if m.startswith("kvq") else HF_COLORS.get(m, "#7f7f7f")  # dynamic@backend: grey
            ax.plot(xs, ys, marker="o", color=c, label=m,
                    lw=2.2 if m.startswith("kvq") else 1.3, ls="-" if m.startswith("kvq") else "--")
        plain_log_y(ax)
        log2_ctx_axis(ax, ctxs)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("ms per decode step (whole model)")
    legend_right(fig, axes[0][-1], "cache")
    fig.suptitle("bench/bench_hf.py: transformers decode, 4 layers of Llama-3-8B shape", fontsize=11)
    return save(fig, png)


def plot_e2e(plt, src, png):
    rows = read_csv(src)
    depths = sorted({int(r["depth"]) for r in rows})
    pos = {d: i for i, d in enumerate(depths)}  # depth 0 has no place on a log axis: one slot per depth
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for t in dict.fromkeys(r["kv"] for r in rows):
        rs = sorted((r for r in rows if r["kv"] == t), key=lambda r: int(r["depth"]))
        xs = [pos[int(r["depth"])] for r in rs]
        a1.plot(xs, [float(r["decode_tok_s"]) for r in rs], marker="o", color=color(t), label=t)
        if rs and rs[0].get("ratio_f16") not in (None, "", "nan"):
            a2.plot(xs, [float(r["ratio_f16"]) for r in rs], marker="o", color=color(t), label=f"{t} measured")
            a2.plot(xs, [float(r["bound"]) for r in rs], ls=":", color=color(t), label=f"{t} bound")
    for ax in (a1, a2):
        ax.set_xticks(range(len(depths)))
        ax.set_xticklabels([ctx_label(d) for d in depths])
        ax.set_xlabel("depth (tokens in the cache)")
        ax.grid(True, alpha=0.3)
    a1.set_ylabel("decode tokens/s (1 sequence)")
    a2.set_ylabel("speed-up over f16")
    legend_right(fig, a2, "KV type")
    fig.suptitle(f"kvq bench ({rows[0]['engine'] if rows else '?'} engine): {os.path.basename(rows[0]['model']) if rows else ''}",
                 fontsize=11)
    return save(fig, png)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend right of the panels
    print("plot: wrote", path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs"))
    ap.add_argument("--csv", default=None, help="with one plot name: read this CSV (any name) instead of DIR's, "
                                                "write the PNG next to it (bench_hf.py --csv X.csv -> X.png)")
    ap.add_argument("which", nargs="*", help="cpu, cuda, quality, hf, e2e (default: every CSV that is there)")
    a = ap.parse_args()
    bad = [w for w in a.which if w not in ("cpu", "cuda", "quality", "hf", "e2e")]
    if bad:
        ap.error(f"unknown plot {bad[0]!r}")
    if a.csv and len(a.which) != 1:
        ap.error("--csv needs exactly one plot name")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib): no PNG written", file=sys.stderr)
        return 0
    jobs = {"cpu": (plot_cpu, ["bench-cpu.csv"]), "cuda": (plot_cuda, ["bench-cuda.csv", "bench-cuda-mixed.csv"]),
            "quality": (plot_quality, ["quality.csv"]), "hf": (plot_hf, ["bench-hf.csv"]),
            "e2e": (plot_e2e, ["bench-e2e-gpu.csv", "bench-e2e-cpu.csv"])}
    rc = 0
    for w in a.which or list(jobs):
        fn, names = jobs[w]
        srcs = [a.csv] if a.csv else [os.path.join(a.dir, n) for n in names]
        todo = [s for s in srcs if os.path.exists(s)]
        if not todo and a.which:  # asked for by name: a CSV of it must be there
            print(f"plot: no {' or '.join(srcs)}", file=sys.stderr)
            rc = 1
        for src in todo:
            fn(plt, src, os.path.splitext(src)[0] + ".png")
            plt.close("all")
    return rc


if __name__ == "__main__":
    sys.exit(main())
