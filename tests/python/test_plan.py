"""kvq-plan files in Python (python/kvq/plan.py, docs/kv-plan.md): the same texts accepted and refused, with the same
messages, as the C reader (tests/test_cli_parse.c, test_plan); writing and reading back; the numpy-only part."""
import os

import pytest

import kvq
from kvq.plan import MAX_LINE, Plan, PlanError


def test_accepts_what_the_c_reader_accepts():
    p = Plan.from_text("# a plan\n\nkvq-plan 1   # version\n n_layers\t5\r\nlayer 4 q8/q4\nlayer 0 q4\nlayer 2 q2\n"
                       "budget 3.5\nlayer 1 q8_0/q4_1\nlayer 3 Q2\nsensitivity 0 q2 0.1 2.8\nfuture_field a b c d\n")
    assert p.n_layers == 5
    assert p.types == [("q4", "q4"), ("q8", "q4"), ("q2", "q2"), ("q2", "q2"), ("q8", "q4")]
    assert p.keys == ["q4", "q8", "q2", "q2", "q8"] and p.values[1] == "q4"
    assert p.budget == 3.5 and p.sensitivity == {(0, "q2"): (0.1, 2.8)}


@pytest.mark.parametrize("text,want", [
    ("", "empty: not a kvq plan"),
    ("# only a comment\n", "empty: not a kvq plan"),
    ("n_layers 2\n", "line 1: not a kvq plan"),
    ("kvq-plan 2\nn_layers 1\nlayer 0 q4\n", "written by a newer kvq (this one reads version 1)"),
    ("kvq-plan 0\n", "line 1: 'kvq-plan 0': the version is not a number >= 1"),
    ("kvq-plan x\n", "the version is not a number"),
    ("kvq-plan 1\n", "no n_layers line"),
    ("kvq-plan 1\nlayer 0 q4\n", "line 2: a layer line before n_layers"),
    ("kvq-plan 1\nn_layers 0\n", "line 2: n_layers must be one number in 1..4096"),
    ("kvq-plan 1\nn_layers 4097\n", "n_layers must be one number in 1..4096"),
    ("kvq-plan 1\nn_layers 2\nn_layers 2\n", "line 3: n_layers given twice"),
    ("kvq-plan 1\nn_layers 2\nlayer 0 q4\n", "1 of its 2 layers have no 'layer' line (the first: layer 1)"),
    ("kvq-plan 1\nn_layers 2\nlayer 2 q4\n", "line 3: not 'layer L TYPE[/TYPE]' with L in 0..1"),
    ("kvq-plan 1\nn_layers 2\nlayer -1 q4\n", "line 3: not 'layer L"),
    ("kvq-plan 1\nn_layers 2\nlayer 0\n", "line 3: not 'layer L"),
    ("kvq-plan 1\nn_layers 2\nlayer 0 q4 q2\n", "line 3: not 'layer L"),
    ("kvq-plan 1\nn_layers 2\nlayer 0 q4\nlayer 0 q2\n", "line 4: layer 0 given twice"),
    ("kvq-plan 1\nn_layers 1\nlayer 0 q5\n", "line 3: layer 0: type: unknown KV type 'q5'"),
    ("kvq-plan 1\nn_layers 1\nlayer 0 q4/\n", "line 3: layer 0: type: unknown KV type ''"),
    ("kvq-plan 1\nn_layers 1\nlayer 0 q4_0\n", "has no kvq equivalent"),
    ("kvq-plan 1\nn_layers 1\nlayer 0 q4\x01\n", "line 3: a control character (byte 1)"),
    ("kvq-plan 1\nn_layers 1\nlayer 0 q4\x00 junk\n", "line 3: a control character (byte 0)"),
    ("kvq-plan 1\n" + " " * (MAX_LINE + 1), f"line 2 is longer than {MAX_LINE} characters"),
    ("kvq-plan 1\nn_layers ²\n", "n_layers must be one number"),
])
def test_refuses_what_the_c_reader_refuses(text, want):
    with pytest.raises(PlanError, match=None) as e:
        Plan.from_text(text)
    assert want in str(e.value)


def test_round_trip_and_files(tmp_path):
    p = Plan(types=["q4", ("q8", "q4"), "q2"], budget=4.0, bits=3.49, bits_ctx=8192, predicted_kld=0.0293,
             candidates=["q2", "q4", "f16"], sensitivity={(0, "q2"): (0.39, 2.84), (1, "q4"): (0.0003, 4.8)})
    f = tmp_path / "p.plan"
    p.save(f)
    text = f.read_text()
    assert text.startswith("kvq-plan 1\n") and "layer 1 q8/q4\n" in text and "sensitivity 0 q2 0.39000000 2.840000" in text
    q = kvq.load_plan(f)
    assert q.types == p.types and q.budget == 4.0 and q.bits_ctx == 8192 and q.sensitivity == p.sensitivity
    assert kvq.load_plan(str(f)).types == p.types
    with pytest.raises(PlanError, match="is a directory"):
        kvq.load_plan(tmp_path)
    with pytest.raises(FileNotFoundError):
        kvq.load_plan(tmp_path / "missing")
    (tmp_path / "big").write_bytes(b"kvq-plan 1\n" + b"#" * (1 << 20))
    with pytest.raises(PlanError, match="more than a plan's 1048576"):
        kvq.load_plan(tmp_path / "big")
    with pytest.raises(PlanError, match="'.*bad': line 1: not a kvq plan"):
        (tmp_path / "bad").write_text("hello\n")
        kvq.load_plan(tmp_path / "bad")


def test_constructor_checks_types():
    with pytest.raises(ValueError):
        Plan(types=["q5"])
    with pytest.raises(PlanError):
        Plan(types=[])
    assert Plan(types=[2, "Q4"]).types == [("q8", "q8"), ("q4", "q4")]


def test_replan_greedy():
    """The greedy of kvq calibrate on a table with a known answer: 3 layers, candidates q2 (2 bits) and q4 (4 bits);
    layer 1 loses the most at q2, so a budget of 2.7 buys it q4 first ((2 + 4 + 2) / 3 = 2.67), 3.4 buys layer 2 too,
    and no budget buys a candidate that saves nothing (layer 0's q4 KLD equals its q2's)."""
    sens = {(0, "q2"): (0.01, 2.0), (0, "q4"): (0.01, 4.0), (1, "q2"): (0.5, 2.0), (1, "q4"): (0.05, 4.0),
            (2, "q2"): (0.2, 2.0), (2, "q4"): (0.02, 4.0)}
    p = Plan(types=["q2"] * 3, candidates=["q2", "q4"], sensitivity=sens, bits_ctx=2048)
    assert p.replan(2.0).types == [("q2", "q2")] * 3
    a = p.replan(2.7)
    assert a.keys == ["q2", "q4", "q2"] and abs(a.bits - 8 / 3) < 1e-12 and abs(a.predicted_kld - 0.26) < 1e-12
    assert p.replan(3.4).keys == ["q2", "q4", "q4"] and p.replan(16).keys == ["q2", "q4", "q4"]
    assert a.bits_ctx == 2048 and a.sensitivity == sens
    with pytest.raises(ValueError, match="the cheapest plan .* needs 2.000 bits"):
        p.replan(1.5)
    with pytest.raises(PlanError, match="no sensitivity table"):
        Plan(types=["q2"]).replan(3)
    with pytest.raises(ValueError, match="lacks 1"):
        Plan(types=["q2"] * 3, candidates=["q2", "q4"], sensitivity={k: v for k, v in sens.items() if k != (2, "q4")}).replan(3)
    text = a.to_text()  # the table survives a file: the same re-plan from it
    assert Plan.from_text(text).replan(3.4).types == p.replan(3.4).types
