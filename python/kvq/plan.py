"""kvq-plan files: every layer's KV cache types (docs/kv-plan.md). The C reader is src/cli/plan.c; both refuse and
accept the same texts (tests/python/test_plan.py, tests/test_cli_parse.c).

    plan = kvq.load_plan("smollm2.plan")          # written by `kvq calibrate -o` or kvq.calibrate(...).save()
    cache = kvq.KVQCache(model.config, plan=plan)  # or plan="smollm2.plan"
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native as N

PLAN_VERSION = 1
MAX_LAYERS = 4096
MAX_BYTES = 1 << 20
MAX_LINE = 1024
# llama.cpp's names read as kvq's types (as kvq_cli_parse_type does); its other types have no kvq equivalent
_ALIASES = {"q8_0": "q8", "q4_1": "q4"}
_UNMAPPED = ("f32", "q4_0", "q5_0", "q5_1", "iq4_nl")


class PlanError(ValueError):
    """A kvq-plan text or file that cannot be read: the message names the line and the problem."""


def _type(word: str, line: int, layer: int) -> str:
    w = _ALIASES.get(word.lower(), word)
    if w.lower() in _UNMAPPED:
        raise PlanError(f"line {line}: layer {layer}: type: llama.cpp's type '{word}' has no kvq equivalent")
    try:
        return N.type_name(N.type_from_name(w))
    except (ValueError, TypeError):
        raise PlanError(f"line {line}: layer {layer}: type: unknown KV type '{word}' (f16, bf16, q8, fp8, q4, q3, q2; "
                        "llama.cpp's q8_0, q4_1)") from None


def _int_word(w: str, lo: int, hi: int) -> Optional[int]:
    # the C reader's strict integers: decimal digits only, a sign only where negatives are allowed
    if not w or not (w.isdigit() and w.isascii()):
        return None
    v = int(w)
    return v if lo <= v <= hi else None


@dataclass
class Plan:
    """Every layer's (keys, values) types, plus how the plan was chosen (informational: the cache reads `types` only).

    types: one (keys, values) pair of kvq type names per layer.
    budget, bits, bits_ctx, predicted_kld, candidates, sensitivity: as docs/kv-plan.md describes them; sensitivity
    maps (layer, candidate) to (KLD, bits per element)."""

    types: List[Tuple[str, str]]
    budget: Optional[float] = None
    bits: Optional[float] = None
    bits_ctx: Optional[int] = None
    predicted_kld: Optional[float] = None
    candidates: List[str] = field(default_factory=list)
    sensitivity: Dict[Tuple[int, str], Tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.types, (list, tuple)) or not 1 <= len(self.types) <= MAX_LAYERS:
            raise PlanError(f"a plan has 1..{MAX_LAYERS} layers")
        norm = []
        for i, t in enumerate(self.types):
            k, v = (t, t) if isinstance(t, (str, int)) else tuple(t)
            norm.append((N.type_name(N.type_from_name(k)), N.type_name(N.type_from_name(v))))
        self.types = norm

    @property
    def n_layers(self) -> int:
        return len(self.types)

    @property
    def keys(self) -> List[str]:
        return [k for k, _ in self.types]

    @property
    def values(self) -> List[str]:
        return [v for _, v in self.types]

    def to_text(self) -> str:
        out = [f"kvq-plan {PLAN_VERSION}",
               "# every layer's KV cache types (docs/kv-plan.md): kvq run/perplexity --kv-plan FILE, "
               "kvq.KVQCache(config, plan=FILE)",
               f"n_layers {self.n_layers}"]
        out += [f"layer {i} {k}/{v}" for i, (k, v) in enumerate(self.types)]
        info = []
        if self.budget is not None:
            info.append(f"budget {self.budget:.4f}")
        if self.bits is not None:
            info.append(f"bits {self.bits:.4f}")
        if self.bits_ctx is not None:
            info.append(f"bits_ctx {int(self.bits_ctx)}")
        if self.predicted_kld is not None:
            info.append(f"predicted_kld {self.predicted_kld:.8f}")
        if self.candidates:
            info.append("candidates " + " ".join(self.candidates))
        info += [f"sensitivity {l} {t} {k:.8f} {b:.6f}" for (l, t), (k, b) in sorted(self.sensitivity.items())]
        if info:
            out.append("# how it was chosen (ignored by the readers)")
        return "\n".join(out + info) + "\n"

    def replan(self, budget: float) -> "Plan":
        """Another plan from this one's sensitivity table (kvq.calibrate's, or a kvq-plan file's `sensitivity` lines)
        for another budget, in milliseconds: what `kvq calibrate --load` does with its CSV. The bits stay counted at
        this plan's bits_ctx. Needs torch-free numpy only."""
        if not self.sensitivity or not self.candidates:
            raise PlanError("this plan has no sensitivity table (kvq calibrate -o and kvq.calibrate write one)")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.5 <= float(budget) <= 32:
            raise ValueError(f"kvq: budget = {budget!r} must be a number of bits in 0.5..32")
        return plan_for_budget(self.sensitivity, self.candidates, self.n_layers, float(budget), self.bits_ctx)

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="ascii") as f:
            f.write(self.to_text())

    @classmethod
    def from_text(cls, text: Union[str, bytes]) -> "Plan":
        """Parses a plan; PlanError (naming the line) for anything the C reader refuses too."""
        raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
        if len(raw) > MAX_BYTES:
            raise PlanError(f"{len(raw)} bytes, more than a plan's {MAX_BYTES}")
        version = 0
        n_layers = 0
        types: dict = {}
        info: dict = {"sensitivity": {}}
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for no, b in enumerate(lines, 1):
            if len(b) > MAX_LINE:
                raise PlanError(f"line {no} is longer than {MAX_LINE} characters")
            bad = next((c for c in b if c < 0x20 and c not in (0x09, 0x0D)), None)
            if bad is not None:
                raise PlanError(f"line {no}: a control character (byte {bad})")
            s = b.decode("latin-1").split("#", 1)[0]
            w = s.replace("\t", " ").replace("\r", " ").split()
            if not w:
                continue
            if not version:
                if len(w) != 2 or w[0] != "kvq-plan":
                    raise PlanError(f"line {no}: not a kvq plan (its first line must be 'kvq-plan {PLAN_VERSION}')")
                v = _int_word(w[1], 1, 1000000)
                if v is None:
                    raise PlanError(f"line {no}: 'kvq-plan {w[1]}': the version is not a number >= 1")
                if v > PLAN_VERSION:
                    raise PlanError(f"version {v}: written by a newer kvq (this one reads version {PLAN_VERSION})")
                version = v
            elif w[0] == "n_layers":
                if n_layers:
                    raise PlanError(f"line {no}: n_layers given twice")
                v = _int_word(w[1], 1, MAX_LAYERS) if len(w) == 2 else None
                if v is None:
                    raise PlanError(f"line {no}: n_layers must be one number in 1..{MAX_LAYERS}")
                n_layers = v
            elif w[0] == "layer":
                if not n_layers:
                    raise PlanError(f"line {no}: a layer line before n_layers")
                li = _int_word(w[1], 0, n_layers - 1) if len(w) == 3 else None
                if li is None:
                    raise PlanError(f"line {no}: not 'layer L TYPE[/TYPE]' with L in 0..{n_layers - 1}")
                if li in types:
                    raise PlanError(f"line {no}: layer {li} given twice")
                k, _, v = w[2].partition("/")
                types[li] = (_type(k, no, li), _type(v if "/" in w[2] else k, no, li))
            else:  # informational lines: kept when well formed, ignored otherwise (as the C reader ignores them)
                try:
                    if w[0] in ("budget", "bits", "predicted_kld") and len(w) == 2:
                        info[w[0]] = float(w[1])
                    elif w[0] == "bits_ctx" and len(w) == 2:
                        info["bits_ctx"] = int(w[1])
                    elif w[0] == "candidates":
                        info["candidates"] = w[1:]
                    elif w[0] == "sensitivity" and len(w) == 5:
                        info["sensitivity"][(int(w[1]), w[2])] = (float(w[3]), float(w[4]))
                except ValueError:
                    pass
        if not version:
            raise PlanError(f"empty: not a kvq plan (its first line must be 'kvq-plan {PLAN_VERSION}')")
        if not n_layers:
            raise PlanError("no n_layers line")
        if len(types) < n_layers:
            first = next(i for i in range(n_layers) if i not in types)
            raise PlanError(f"{n_layers - len(types)} of its {n_layers} layers have no 'layer' line "
                            f"(the first: layer {first})")
        return cls(types=[types[i] for i in range(n_layers)], **info)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Plan":
        p = os.fspath(path)
        if os.path.isdir(p):
            raise PlanError(f"'{p}' is a directory")
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        try:
            return cls.from_text(raw)
        except PlanError as e:
            raise PlanError(f"'{p}': {e}") from None


def load_plan(path: Union[str, os.PathLike]) -> Plan:
    """Reads a kvq-plan file (docs/kv-plan.md)."""
    return Plan.load(path)


def plan_for_budget(sensitivity: dict, candidates: Sequence[str], n_layers: int, budget: float,
                    bits_ctx: Optional[int] = None) -> Plan:
    """The plan of the lowest summed sensitivity within `budget` bits per element, from a table (layer, candidate) ->
    (KLD, bits per element with every layer at that candidate), as kvq.calibrate measures it and Plan.sensitivity
    keeps it: every layer starts at its cheapest candidate, then the upgrade with the most KLD saved per bit added
    is taken while it fits (src/cli/calibrate.c's greedy, the same tie-breaking: the first layer, then the first
    candidate, of the best ratio)."""
    NL, names = n_layers, list(candidates)
    miss = [(l, t) for l in range(NL) for t in names if (l, t) not in sensitivity]
    if miss:
        raise ValueError(f"kvq: the sensitivity table lacks {len(miss)} (layer, candidate) entries, e.g. {miss[0]}")
    kld = np.array([[sensitivity[l, t][0] for t in names] for l in range(NL)])
    cost = np.array([[sensitivity[l, t][1] / NL for t in names] for l in range(NL)])  # each layer's share of the mean
    pick = [int(np.argmin(cost[l])) for l in range(NL)]  # argmin: the first of equal costs
    used = float(sum(cost[l, pick[l]] for l in range(NL)))
    if used > budget * (1 + 1e-9):
        raise ValueError(f"kvq: budget {budget:.3f}: the cheapest plan (every layer its cheapest candidate) needs "
                         f"{used:.3f} bits")
    while True:
        best, bl, bt = 0.0, -1, -1
        for l in range(NL):
            for j in range(len(names)):
                db = cost[l, j] - cost[l, pick[l]]
                dk = kld[l, pick[l]] - kld[l, j]
                if db <= 0 or dk <= 0 or used + db > budget * (1 + 1e-9):
                    continue
                if dk / db > best:
                    best, bl, bt = dk / db, l, j
        if bl < 0:
            break
        used += cost[bl, bt] - cost[bl, pick[bl]]
        pick[bl] = bt
    types = []
    for l in range(NL):
        k, _, v = names[pick[l]].partition("/")
        types.append((k, v or k))
    return Plan(types=types, budget=budget, bits=used, bits_ctx=bits_ctx,
                predicted_kld=float(sum(kld[l, pick[l]] for l in range(NL))), candidates=names,
                sensitivity=dict(sensitivity))
