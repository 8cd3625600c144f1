"""ctest entry for the Python tests: runs pytest on one group of tests/python and turns its result into ctest's.

  python3 run_pytest.py [--group bindings|hf|cuda|all] [--dir DIR] [pytest args...]

Groups (the file names decide): `hf` is test_hf*.py (torch + transformers on the CPU), `cuda` is test_cuda*.py
(a GPU and kvq's CUDA library), `bindings` is every other test_*.py (numpy only), `all` is all of them.

Exit codes, so that a skip is never reported as a pass:
  77 (ctest SKIP) only when the whole group cannot run on this machine: numpy or pytest missing (any group), torch
     or transformers missing (hf, cuda), no CUDA device or no kvq CUDA library (cuda). The reason is printed.
  1  when a test that must run here was skipped: any skip in `bindings`; any skip in `hf` (torch and transformers
     are installed, so every HF test must run), any skip in `cuda` when it ran. With KVQ_REQUIRE_HF=1 (CI sets it)
     a missing torch / transformers / numpy / pytest fails the hf group instead of skipping it; KVQ_REQUIRE_CUDA=1
     does the same for the cuda group. With `all`, each file is judged by its group.
  otherwise pytest's own exit code (0 all passed; 5, no test collected, is a failure too).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = 77


def group_of(path: str) -> str:
    base = os.path.basename(path)
    if base.startswith("test_hf"):
        return "hf"
    if base.startswith("test_cuda"):
        return "cuda"
    return "bindings"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "no", "false", "off")


def _missing(mods) -> list[str]:
    out = []
    for m in mods:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except (ImportError, ValueError):
            out.append(m)
    return out


def why_cannot_run(group: str) -> str:
    """'' when `group` can run on this machine, else why not."""
    miss = _missing(["numpy", "pytest"] + (["torch", "transformers"] if group in ("hf", "cuda") else []))
    if miss:
        return f"python modules missing: {', '.join(miss)}"
    if group == "cuda":
        try:
            import torch
        except Exception as e:  # noqa: BLE001 - a torch that is installed but broken
            return f"torch cannot be imported: {type(e).__name__}: {e}"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
        import kvq
        ok, why = kvq.cuda_available()
        if not ok:
            return f"kvq CUDA backend: {why}"
    return ""


def required(group: str) -> bool:
    """Whether a group that cannot run fails instead of skipping."""
    if group == "hf":
        return _flag("KVQ_REQUIRE_HF")
    if group == "cuda":
        return _flag("KVQ_REQUIRE_CUDA")
    return _flag("KVQ_REQUIRE_HF") or _flag("KVQ_REQUIRE_CUDA")  # CI's flag: numpy and pytest must be there too


class SkipRecorder:
    """pytest plugin: every skipped test or module (node id, reason)."""

    def __init__(self):
        self.skips: list[tuple[str, str]] = []

    @staticmethod
    def _reason(report) -> str:
        lr = report.longrepr
        if isinstance(lr, tuple) and len(lr) == 3:
            return str(lr[2])
        return str(lr)

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            self.skips.append((report.nodeid, self._reason(report)))

    def pytest_collectreport(self, report):
        if report.skipped:
            self.skips.append((report.nodeid, self._reason(report)))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", choices=("bindings", "hf", "cuda", "all"), default="all")
    ap.add_argument("--dir", default=HERE, help="folder of the test files (default: this one)")
    args, rest = ap.parse_known_args(argv)
    files = sorted(glob.glob(os.path.join(args.dir, "test_*.py")))
    groups = ("bindings", "hf", "cuda") if args.group == "all" else (args.group,)
    chosen, skipped_groups = [], []
    for g in groups:
        gf = [f for f in files if group_of(f) == g]
        if not gf:
            if args.group != "all":
                print(f"FAIL: no test files of group {g} in {args.dir}")
                return 1
            continue
        why = why_cannot_run(g)
        if why:
            if required(g):
                print(f"FAIL: the {g} tests must run here (KVQ_REQUIRE_HF / KVQ_REQUIRE_CUDA) but cannot: {why}")
                return 1
            print(f"SKIP: {g} tests ({', '.join(os.path.basename(f) for f in gf)}): {why}")
            skipped_groups.append(g)
            continue
        chosen += gf
    if not chosen:
        return SKIP
    import pytest

    rec = SkipRecorder()
    rc = int(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "--rootdir", args.dir, *chosen, *rest],
                         plugins=[rec]))
    if rc == 5:
        print("FAIL: pytest collected no test")
        return 1
    bad = [(n, r) for n, r in rec.skips]  # every group that ran must run all of its tests
    if bad:
        print(f"FAIL: {len(bad)} test(s) skipped that must run on this machine:")
        for n, r in bad:
            print(f"  {n}: {r}")
        return rc or 1
    if skipped_groups:
        # the groups that ran passed (or failed: rc); the others were reported as SKIP above
        print(f"note: groups not run here: {', '.join(skipped_groups)}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
