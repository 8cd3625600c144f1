"""run_pytest.py, ctest's entry for the Python tests: a skip is never reported as a pass.

Each case runs the runner on a folder of small made-up test files and checks its exit code: 77 (ctest SKIP) only
when a whole group cannot run here, 1 when a test that must run here skipped, pytest's code otherwise."""
import os
import subprocess
import sys
import textwrap

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_pytest.py")
PASS = "def test_ok():\n    assert 1 + 1 == 2\n"
SKIPS = "import pytest\n\ndef test_ok():\n    pass\n\ndef test_skips():\n    pytest.skip('not here')\n"
NEEDS_MISSING_MODULE = ("import pytest\npytest.importorskip('kvq_no_such_module')\n\ndef test_x():\n    pass\n")


def run(tmp_path, files, group, env=None, block_torch=False, extra=()):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    e = {k: v for k, v in os.environ.items() if k not in ("KVQ_REQUIRE_HF", "KVQ_REQUIRE_CUDA")}
    e.update(env or {})
    # block_torch: run as on a machine without torch / transformers, whether or not this one has them
    code = textwrap.dedent(f"""
        import runpy, sys
        if {block_torch!r}:
            sys.modules['torch'] = None
            sys.modules['transformers'] = None
        sys.argv = [{RUNNER!r}, '--group', {group!r}, '--dir', {str(tmp_path)!r}, *{list(extra)!r}]
        runpy.run_path({RUNNER!r}, run_name='__main__')
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=e,
                       cwd=str(tmp_path))
    return p.returncode, p.stdout + p.stderr


def test_bindings_all_pass(tmp_path):
    rc, out = run(tmp_path, {"test_a.py": PASS}, "bindings")
    assert rc == 0, out


def test_bindings_skip_fails(tmp_path):
    rc, out = run(tmp_path, {"test_a.py": SKIPS}, "bindings")
    assert rc == 1 and "must run on this machine" in out and "test_skips" in out, out


def test_bindings_module_skip_fails(tmp_path):
    rc, out = run(tmp_path, {"test_a.py": PASS, "test_b.py": NEEDS_MISSING_MODULE}, "bindings")
    assert rc == 1 and "test_b.py" in out, out


def test_bindings_failure_is_a_failure(tmp_path):
    rc, out = run(tmp_path, {"test_a.py": "def test_bad():\n    assert False\n"}, "bindings")
    assert rc == 1, out


def test_no_test_collected_fails(tmp_path):
    rc, out = run(tmp_path, {"test_a.py": "x = 1\n"}, "bindings")
    assert rc == 1 and "no test" in out, out


def test_hf_without_torch_is_a_ctest_skip(tmp_path):
    rc, out = run(tmp_path, {"test_hf.py": NEEDS_MISSING_MODULE}, "hf", block_torch=True)
    assert rc == 77 and "SKIP" in out and "torch" in out, out


def test_hf_without_torch_fails_when_required(tmp_path):
    rc, out = run(tmp_path, {"test_hf.py": NEEDS_MISSING_MODULE}, "hf", env={"KVQ_REQUIRE_HF": "1"},
                  block_torch=True)
    assert rc == 1 and "must run here" in out, out


def test_hf_with_torch_every_test_must_run(tmp_path):
    """With torch and transformers installed (fakes here), an HF test that skips fails the group."""
    for mod in ("torch", "transformers"):
        (tmp_path / "site" / mod).mkdir(parents=True)
        (tmp_path / "site" / mod / "__init__.py").write_text("")
    env = {"PYTHONPATH": str(tmp_path / "site") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rc, out = run(tmp_path, {"test_hf.py": SKIPS}, "hf", env=env)
    assert rc == 1 and "test_skips" in out, out
    rc, out = run(tmp_path, {"test_hf.py": PASS}, "hf", env=env)
    assert rc == 0, out


def test_all_reports_each_group(tmp_path):
    rc, out = run(tmp_path, {"test_a.py": PASS, "test_hf.py": NEEDS_MISSING_MODULE,
                             "test_cuda.py": NEEDS_MISSING_MODULE}, "all", block_torch=True)
    assert rc == 0 and "SKIP: hf tests" in out and "SKIP: cuda tests" in out and "1 passed" in out, out


def _fake_hf_site(tmp_path, transformers_version="5.24.0"):
    """A folder with importable stand-ins for torch and transformers (of the given version) -> env for run()."""
    for mod in ("torch", "transformers"):
        (tmp_path / "site" / mod).mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / mod / "__init__.py").write_text(f"__version__ = {transformers_version!r}\n")
    return {"PYTHONPATH": str(tmp_path / "site") + os.pathsep + os.environ.get("PYTHONPATH", "")}


WARNS = ("import warnings\n\ndef test_warns():\n    warnings.warn('{}', {})\n")


def test_hf_deprecation_and_future_warnings_fail(tmp_path):
    """In the transformers groups a DeprecationWarning or FutureWarning (e.g. a deprecated cache argument name) fails
    the test that raised it; other warnings do not."""
    env = _fake_hf_site(tmp_path)
    for cat, want in (("FutureWarning", 1), ("DeprecationWarning", 1), ("UserWarning", 0)):
        rc, out = run(tmp_path, {"test_hf.py": WARNS.format("past_key_values is deprecated", cat)}, "hf", env=env)
        assert rc == want, (cat, out)


def test_hf_oldest_interpreter_missing_is_a_skip_unless_required(tmp_path):
    args = ("--python", str(tmp_path / "no-venv" / "bin" / "python"), "--transformers", "oldest")
    rc, out = run(tmp_path, {"test_hf.py": PASS}, "hf", extra=args)
    assert rc == 77 and "SKIP" in out and "setup.sh" in out, out
    rc, out = run(tmp_path, {"test_hf.py": PASS}, "hf", env={"KVQ_REQUIRE_HF": "1"}, extra=args)
    assert rc == 1 and "must run here" in out, out


def test_hf_oldest_checks_the_transformers_version(tmp_path):
    """--transformers oldest runs only on pyproject.toml's lower bound: another version fails, that one runs."""
    sys.path.insert(0, os.path.dirname(RUNNER))
    import run_pytest
    oldest = run_pytest.oldest_transformers()
    rc, out = run(tmp_path, {"test_hf.py": PASS}, "hf", env=_fake_hf_site(tmp_path, "5.999.0"),
                  extra=("--transformers", "oldest"))
    assert rc == 1 and "oldest" in out and oldest in out, out
    rc, out = run(tmp_path, {"test_hf.py": PASS}, "hf", env=_fake_hf_site(tmp_path, oldest + ".3"),
                  extra=("--transformers", "oldest"))
    assert rc == 0 and "1 passed" in out, out
