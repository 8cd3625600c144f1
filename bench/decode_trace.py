#!/usr/bin/env python3
"""Where a decode launch's time goes, per CTA: reads the KVQ_TRACE_FILE of a diagnostic build.

Build: cmake -S . -B build-tr -DKVQ_CUDA=ON -DCMAKE_CUDA_FLAGS=-DKVQ_DECODE_TRACE ... (decode.cuh stamps each CTA's
entry, first page, producer end, each consumer warp's end, epilogue and exit; kvq_cuda.cu writes one line per CTA).
Run:   KVQ_TRACE_FILE=tr.txt build-tr/src/cuda/kvq-bench-cuda --types q4 --ctx 131072 --batch 1
Read:  python3 bench/decode_trace.py tr.txt [--ctas N]   (N: list the N slowest CTAs of one launch per shape)
Times are microseconds from the launch's first CTA entry (globaltimer) or from the CTA's own entry (clock64, scaled
by the CTA's globaltimer span). Never a timed test: the stamps are for reading, the bench's figures for reporting.
"""
import statistics as st
import sys
from collections import defaultdict


def load(path):
    launches, cur = [], None
    for line in open(path):
        f = line.split()
        if not f:
            continue
        if f[0] == 'L':
            toks = f[2:]
            cur = {'meta': {toks[i]: int(toks[i + 1]) for i in range(0, len(toks) - 1, 2)}, 'ctas': []}
            launches.append(cur)
        elif f[0] == 'C' and cur is not None:
            cur['ctas'].append([int(x) for x in f[1:]])
    return launches


def cta_row(c, g0):
    cta, v = c[0], c[1:]
    cyc = v[19] - v[3]
    ns = (v[1] - v[0]) / cyc if cyc > 0 else 0.0
    rel = lambda x: (x - v[3]) * ns / 1e3 if x else float('nan')
    w = [rel(v[6 + i]) for i in range(12) if v[6 + i]]
    return {'cta': cta, 'sm': v[2], 'entry': (v[0] - g0) / 1e3, 'exit': (v[1] - g0) / 1e3, 'first page': rel(v[4]),
            'producer done': rel(v[5]), 'first warp done': min(w) if w else float('nan'),
            'last warp done': max(w) if w else float('nan'), 'epilogue done': rel(v[18]), 'cta exit': rel(v[19]),
            'units': v[20], 'merges': v[21], 'clock GHz': 1 / ns if ns else float('nan')}


def main():
    args = sys.argv[1:]
    nslow = 0
    if '--ctas' in args:
        i = args.index('--ctas')
        nslow = int(args[i + 1])
        del args[i:i + 2]
    groups = defaultdict(list)
    for L in load(args[0]):
        m = L['meta']
        groups[(m['tk'], m['tv'], m['D'], m['total'], m['n_cta'])].append(L)
    for (tk, tv, D, total, n_cta), Ls in groups.items():
        Ls = Ls[2:] if len(Ls) > 4 else Ls  # the warm-up launches out
        agg = defaultdict(list)
        for L in Ls:
            cs = [c for c in L['ctas'] if c[1]]
            g0 = min(c[1] for c in cs)
            rows = [cta_row(c, g0) for c in cs]
            ends = sorted(r['exit'] for r in rows)
            agg['kernel span'].append(ends[-1])
            agg['exit of the median CTA'].append(ends[len(ends) // 2])
            agg['entry spread'].append(max(r['entry'] for r in rows))
            for r in rows:
                for k in ('first page', 'producer done', 'last warp done', 'epilogue done', 'cta exit', 'units'):
                    agg['cta: ' + k].append(r[k])
                if r['merges']:
                    agg['cta: merge (CTAs that merge)'].append(r['cta exit'] - r['epilogue done'])
        print(f"== key type {tk}, value type {tv}, D {D}: {total} units over {n_cta} CTAs, {len(Ls)} launches")
        for k, v in agg.items():
            v = [x for x in v if x == x]
            if v:
                print(f"  {k:32s} median {st.median(v):9.2f}  min {min(v):9.2f}  max {max(v):9.2f}")
        if nslow and Ls:
            L = Ls[len(Ls) // 2]
            cs = [c for c in L['ctas'] if c[1]]
            g0 = min(c[1] for c in cs)
            rows = sorted((cta_row(c, g0) for c in cs), key=lambda r: -r['exit'])
            keys = ['cta', 'sm', 'exit', 'first page', 'producer done', 'last warp done', 'epilogue done', 'units', 'merges']
            print('  slowest CTAs of one launch: ' + ', '.join(keys))
            for r in rows[:nslow] + [rows[len(rows) // 2]]:
                print('   ' + ' '.join(f"{r[k]:8.2f}" if isinstance(r[k], float) else f"{r[k]:8d}" for k in keys))


if __name__ == '__main__':
    main()
