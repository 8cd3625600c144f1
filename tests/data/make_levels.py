#!/usr/bin/env python3
"""Non-uniform decode levels of the grouped types (kvq.h sections 5 and 10): Lloyd-Max quantizers, data-free.

A group of G = 64 values (a key channel over 64 tokens, or a value token's 64 channels) is stored as codes q with
x = scale * L[q] + min, scale = (max - min) / qmax, L[q] = lv16[q] / 16 in [0, qmax] (qmax = 2^b - 1). After a
Hadamard rotation a group's values are close to Gaussian, so v = (x - min) / scale lies in [0, qmax] with the
distribution of a normalized Gaussian sample of 64: dense in the middle, sparse near the ends (where only the
group's extremes sit). Lloyd-Max for that distribution, with each value's squared error weighted by scale^2
(the error of x, not of v), gives the levels; they need not include the ends (clipping the extremes is optimal).

The levels are then rounded to a grid: multiples of 1/8 of a step (Q4, Q3: lv16 even, lv16 / 2 <= 120 fits a
signed byte for a byte-shuffle lookup) or 1/4 (Q2: lv16 / 4 <= 12, which an 8-bit weight meets in the value
kernels' unsigned 16-bit sums as the uniform codes <= 15 do). The script prints what that rounding costs: at
50k groups, the MSE relative to uniform of Q4 0.841 (1/16 grid) / 0.845 (1/8) / 0.867 (1/4) / 1.030 (1/2), Q3
0.775 / 0.775 / 0.829 / 0.915, Q2 0.560 / 0.574 / 0.574 / 0.851: coarser grids give the gain back.

    python3 tests/data/make_levels.py            # prints the tables as C initializers and the MSEs
numpy only; deterministic (seeded)."""
import numpy as np

G = 64
GROUPS = 200_000
GRID = {4: 2, 3: 2, 2: 4}  # lv16 multiple per bits


def samples(rng, qmax):
    x = rng.standard_normal((GROUPS, G))
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    scale = (hi - lo) / qmax
    v = (x - lo) / scale
    w = np.broadcast_to(scale ** 2, v.shape)  # error of x = scale * error of v
    return v.ravel(), w.ravel()


def mse(v, w, levels):
    levels = np.sort(np.asarray(levels, dtype=np.float64))
    mids = (levels[1:] + levels[:-1]) / 2
    q = np.searchsorted(mids, v)
    return float(np.sum(w * (v - levels[q]) ** 2) / np.sum(w))


def lloyd_max(v, w, qmax, iters=200):
    levels = np.arange(qmax + 1, dtype=np.float64)
    order = np.argsort(v)
    vs, ws = v[order], w[order]
    cw, cwv = np.concatenate([[0], np.cumsum(ws)]), np.concatenate([[0], np.cumsum(ws * vs)])
    for _ in range(iters):
        mids = (levels[1:] + levels[:-1]) / 2
        edges = np.concatenate([[0], np.searchsorted(vs, mids), [len(vs)]])
        new = (cwv[edges[1:]] - cwv[edges[:-1]]) / np.maximum(cw[edges[1:]] - cw[edges[:-1]], 1e-30)
        if np.allclose(new, levels, atol=1e-9):
            break
        levels = new
    return levels


def main():
    rng = np.random.default_rng(20261203)
    for bits in (4, 3, 2):
        qmax = (1 << bits) - 1
        v, w = samples(rng, qmax)
        lm = lloyd_max(v, w, qmax)
        m = GRID[bits]
        lv16 = np.clip(np.round(lm * 16 / m) * m, 0, 16 * qmax).astype(int)
        e_u, e_lm, e_r = mse(v, w, np.arange(qmax + 1)), mse(v, w, lm), mse(v, w, lv16 / 16)
        print(f"Q{bits}: Lloyd-Max levels (steps) {np.round(lm, 4).tolist()}")
        print(f"    lv16 (multiples of {m}/16): {{{', '.join(map(str, lv16))}}}")
        print(f"    MSE in steps^2 (x error / scale^2, scale-weighted): uniform {e_u:.5f} (1/12 = {1 / 12:.5f}), "
              f"Lloyd-Max {e_lm:.5f} ({e_lm / e_u:.3f} x uniform), rounded table {e_r:.5f} ({e_r / e_u:.3f} x)")


if __name__ == "__main__":
    main()
