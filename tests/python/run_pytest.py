"""ctest entry: runs pytest on tests/python; exits 77 (ctest SKIP) when numpy or pytest is not installed."""
import importlib.util
import os
import sys

missing = [m for m in ("numpy", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    print(f"SKIP: python modules missing: {', '.join(missing)}")
    sys.exit(77)
import pytest  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
sys.exit(pytest.main(["-q", "-rs", "-p", "no:cacheprovider", here, *sys.argv[1:]]))
