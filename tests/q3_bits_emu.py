"""Desk check (not a registered test): decode.cuh's Q3 bit manipulation -- spread_nibbles/spread16, q3_sel, lut4,
   raw_pair (prmt/lop3 emulated), load_key_q3, value_frags' Q3 path, KeySlots and the scale/min pair selectors -- against
   quant.c's Q3 row layout. It checks a Python copy of the device logic: run it after changing that logic, then
   test on a GPU (test_cuda compares pages and attention with the CPU core). python3 tests/q3_bits_emu.py"""
# Desk check of decode.cuh's Q3 bit manipulation (prmt/lop3 semantics emulated) against quant.c's layout
import random
M = 0xffffffff
def prmt(a, b, s):
    by = [(a >> (8*i)) & 255 for i in range(4)] + [(b >> (8*i)) & 255 for i in range(4)]
    r = 0
    for i in range(4):
        n = (s >> (4*i)) & 15
        v = by[n & 7]
        if n & 8: v = 255 if v & 128 else 0
        r |= v << (8*i)
    return r
def spread_nibbles(t):  # a nibble in each byte: bit k of byte b's nibble to bit 8 b + 2 k
    t = (t | t << 2) & 0x33333333
    return (t | t << 1) & 0x55555555
def spread16(x, sel):  # bit k of x's low (0x4140) or high (0x4342) 16 bits to bit 2 k
    t = prmt(x, 0, sel)
    return spread_nibbles((t | t << 4) & 0x0F0F0F0F)
def q3_sel(L, S):  # nibble n: the code of channel 2 n (se), 2 n + 1 (so)
    se = (L & 0x33333333) | ((S << 2) & M & ~0x33333333)
    so = ((L >> 2) & 0x33333333) | (S & ~0x33333333 & M)
    return se & M, so & M
def lut4(sel, lw): return prmt(lw[0], lw[1], sel & 0xffff)
def raw_pair(r, sel): return prmt(r, 0x64646464, sel)
def hh_spread(h0, h1):  # two tokens' 8 high bits, interleaved by 4 channels, spread (value_frags)
    z = h0 | h1 << 8
    return spread_nibbles((z & 0x0F0F) | ((z << 12) & 0x0F0F0000))
def halves(w): return (w & 0xffff) - 0x6400, (w >> 16) - 0x6400
def key_chan(s, e):
    x = 2*(s % 4) + e//2
    return 16*(s//4) + (4*x if x < 4 else 4*x - 15) + 2*(e % 2)
def value_chan(x, g, hi): return 64*(x//4) + 8*g + x % 4 + 4*hi

def put_row(codes_, D):  # quant.c put_bits, b = 3
    row = bytearray(3*D//8)
    for c, q in enumerate(codes_):
        row[c//4] |= (q & 3) << (2*(c % 4))
        row[D//4 + c//8] |= (q >> 2) << (c % 8)
    return row
def rd(row, off, n): return int.from_bytes(row[off:off+n], 'little')

levels = [6, 24, 38, 50, 62, 74, 88, 106]
lw = [levels[0] | levels[1] << 8 | levels[2] << 16 | levels[3] << 24, levels[4] | levels[5] << 8 | levels[6] << 16 | levels[7] << 24]
bad = 0
for D in (64, 128, 256):
    for trial in range(20):
        q = [random.randrange(8) for _ in range(D)]
        row = put_row(q, D)
        # keys
        for j in range(4):
            NW = D // 64
            lo = rd(row, j*(D//16), 4*NW); hi = rd(row, D//4 + j*(D//32), 2*NW)
            h = [0]*(D//8)
            for m in range(NW):
                L = (lo >> (32*m)) & M; S = spread16(hi >> (32*(m//2)), 0x4342 if m % 2 else 0x4140)
                se, so = q3_sel(L, S)
                r = [lut4(se, lw), lut4(se >> 16, lw), lut4(so, lw), lut4(so >> 16, lw)]
                for q_ in range(4):
                    h[8*m + 2*q_] = raw_pair(r[q_], 0x4140); h[8*m + 2*q_ + 1] = raw_pair(r[q_], 0x4342)
            for s in range(D//16):
                for e in range(4):
                    ch = j*(D//4) + key_chan(s, e)
                    got = halves(h[2*s + e//2])[e % 2]
                    if got != levels[q[ch]]: bad += 1
        # key_chan is a bijection per lane
        assert sorted(key_chan(s, e) for s in range(D//16) for e in range(4)) == list(range(D//4))
# values: 4 token rows
for D in (64, 128, 256):
    for trial in range(20):
        qs = [[random.randrange(8) for _ in range(D)] for _ in range(4)]
        rows = [put_row(q, D) for q in qs]
        for hh in range(D//64):
            for g in range(8):
                lo = [rd(r, 16*hh + 2*g, 2) for r in rows]
                hb = [r[D//4 + 8*hh + g] for r in rows]
                pv = [[0]*8, [0]*8]  # pv[p][c]: channel c's fp16 pair of tokens (2 p, 2 p + 1)
                for p_ in range(2):
                    L = prmt(lo[2*p_], lo[2*p_+1], 0x5140)
                    se, so = q3_sel(L, hh_spread(hb[2*p_], hb[2*p_+1]))
                    for sel, c0 in ((se, 0), (se >> 16, 4), (so, 1), (so >> 16, 5)):
                        r = lut4(sel, lw)
                        pv[p_][c0] = raw_pair(r, 0x4240); pv[p_][c0 + 2] = raw_pair(r, 0x4341)
                for ii in range(4):
                    o = [pv[0][ii], pv[0][ii + 4], pv[1][ii], pv[1][ii + 4]]
                    x = 4*hh + ii
                    clo, chi = value_chan(x, g, 0), value_chan(x, g, 1)
                    exp = [(qs[0][clo], qs[1][clo]), (qs[0][chi], qs[1][chi]), (qs[2][clo], qs[3][clo]), (qs[2][chi], qs[3][chi])]
                    for r in range(4):
                        a, b = halves(o[r])
                        if (a, b) != (levels[exp[r][0]], levels[exp[r][1]]): bad += 1
        # value_chan covers each channel of a 64-group once per (g, x, hi)
    assert sorted(value_chan(x, g, hi) for x in range(D//16) for g in range(8) for hi in range(2)) == list(range(D))
# fp16 window in Q3 order: channel ii (word ii//2, half ii%2) and ii + 4
for ii in range(4):
    wl, wh = ii // 2, ii // 2 + 2
    assert 2*wl + ii % 2 == ii and 2*wh + ii % 2 == ii + 4
print("mismatches:", bad)
def pair_sel(ha, hb): return (0x32 if ha else 0x10) | (0x7600 if hb else 0x5400)
def key_slot(c, D):
    for s in range(D//16):
        for e in range(4):
            if key_chan(s, e) == c: return 4*s + e
bad2 = 0
for D in (64, 128, 256):
    n = D // 4
    qf = [random.randrange(1, 60000) for _ in range(n)]  # stand-ins for fp16 bits
    bq = [0]*(D//8)
    for s in range(D//16):
        bq[2*s] = qf[key_chan(s, 0)] | qf[key_chan(s, 1)] << 16
        bq[2*s+1] = qf[key_chan(s, 2)] | qf[key_chan(s, 3)] << 16
    for x in range(D//8):
        s0, s1 = key_slot(2*x, D), key_slot(2*x+1, D)
        w = prmt(bq[s0//2], bq[s1//2], pair_sel(s0 % 2, s1 % 2))
        if (w & 0xffff, w >> 16) != (qf[2*x], qf[2*x+1]): bad2 += 1
    sc = [random.randrange(1, 60000) for _ in range(n)]
    ksw = [sc[2*i] | sc[2*i+1] << 16 for i in range(n//2)]
    for st in range(D//16):
        for e in range(2):
            ca, cb = key_chan(st, 2*e), key_chan(st, 2*e+1)
            w = prmt(ksw[ca//2], ksw[cb//2], pair_sel(ca % 2, cb % 2))
            if (w & 0xffff, w >> 16) != (sc[ca], sc[cb]): bad2 += 1
# the same generic builder reproduces Q4's and Q2's constants
for b, kc in ((4, lambda s, e: 8*(s//2) + 2*(s % 2) + [0, 4, 1, 5][e]), (2, lambda s, e: 16*(s//4) + 2*(s % 4) + [0, 8, 1, 9][e])):
    OFF = 4 if b == 4 else 8
    for st in range(8):
        lo = kc(st, 0)//2; hi = lo + OFF//2
        for e in range(2):
            ca, cb = kc(st, 2*e), kc(st, 2*e+1)
            assert (ca//2, cb//2, pair_sel(ca % 2, cb % 2)) == (lo, hi, 0x7632 if e else 0x5410)
print("pair mismatches:", bad2)
