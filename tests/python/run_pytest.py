"""ctest entry for the Python tests: runs pytest on one group of tests/python and turns its result into ctest's.

  python3 run_pytest.py [--group bindings|hf|cuda|all] [--dir DIR] [--python PY --transformers oldest] [pytest args...]

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

--python PY runs the group with another interpreter (ctest python_hf_oldest: the environment scripts/setup.sh makes
with the oldest transformers pyproject.toml claims); a PY that does not exist counts as torch / transformers missing
(SKIP, or FAIL with KVQ_REQUIRE_HF=1). --transformers oldest: the installed transformers must be the lower bound of
pyproject.toml's `transformers>=X` (same major.minor), else FAIL: the test would not test what its name says.

In the hf and cuda groups a DeprecationWarning or FutureWarning fails the test that triggers it (pytest -W error::...):
the package claims to work without warnings on every transformers version it accepts.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SKIP = 77
WARNINGS_AS_ERRORS = ("-W", "error::DeprecationWarning", "-W", "error::FutureWarning")


def oldest_transformers() -> str:
    """X of pyproject.toml's hf extra `transformers>=X` (the oldest version the package claims)."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        m = re.search(r'"transformers\s*>=\s*([0-9][0-9.]*)', f.read())
    if not m:
        raise RuntimeError("pyproject.toml has no transformers>=X requirement")
    return m.group(1)


def _major_minor(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


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
    ap.add_argument("--python", default=None, help="interpreter to run the tests with (default: this one)")
    ap.add_argument("--transformers", choices=("oldest",), default=None,
                    help="oldest: the installed transformers must be pyproject.toml's lower bound")
    args, rest = ap.parse_known_args(argv)
    # abspath, not realpath: a venv's python is a link to the base interpreter, and what makes it the venv's is the
    # path it is started by
    if args.python and os.path.abspath(args.python) != os.path.abspath(sys.executable):
        if not os.access(args.python, os.X_OK):
            why = f"python modules missing: torch, transformers (no interpreter {args.python}; scripts/setup.sh makes it)"
            if required(args.group):
                print(f"FAIL: the {args.group} tests must run here (KVQ_REQUIRE_HF / KVQ_REQUIRE_CUDA) but cannot: {why}")
                return 1
            print(f"SKIP: {args.group} tests: {why}")
            return SKIP
        cmd = [args.python, os.path.abspath(__file__), "--group", args.group, "--dir", args.dir]
        if args.transformers:
            cmd += ["--transformers", args.transformers]
        sys.stdout.flush()
        import subprocess
        return subprocess.call(cmd + rest)
    want = oldest_transformers() if args.transformers == "oldest" else None
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
    if want is not None:
        import transformers
        have = transformers.__version__
        if _major_minor(have) != _major_minor(want):
            print(f"FAIL: transformers {have} is installed for {sys.executable}, but this run is for the oldest "
                  f"version pyproject.toml claims ({want})")
            return 1
        print(f"transformers {have} (the oldest pyproject.toml claims: >= {want}), {sys.executable}")
    import pytest

    rec = SkipRecorder()
    strict = WARNINGS_AS_ERRORS if any(group_of(f) in ("hf", "cuda") for f in chosen) else ()
    rc = int(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "--rootdir", args.dir, *strict, *chosen, *rest],
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
