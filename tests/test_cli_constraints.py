"""The constraint invariants of ``convexmix ensemble --max-weight U --max-models K
[--bootstrap N] --out W.json``, and of ``blend``/``score`` reading that file.

On drawn problems (those of ``tests/ensemble/test_constraint_invariants.py``: binary,
multiclass and regression predictions with special values, float32 and float64) and drawn
option strings (valid numbers around the edges, and "nan", "inf", "-1", "0", "1.5", "abc",
...), the command either

* exits 0 and writes a weights file whose weights, and every bootstrap draw's, are
  finite, >= 0, sum to 1, are each at most U and have at most K non-zeros, equal to
  ``fit_weights``' with the same options; ``blend`` then applies exactly those weights;
  or
* exits 2 with exactly one line on stderr (no traceback) and leaves no ``--out`` file,
  exactly when the inputs are invalid, an option is out of its range or the constraints
  are infeasible.

The in-process cases call :func:`convexmix.cli.main`; a few run the real console script
in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from convexmix.cli import main
from convexmix.ensemble import fit_weights
from tests.ensemble.test_constraint_invariants import Problem, check_weights, feasible, problems

#: option strings that must be refused (by argparse: exit 2, one line)
BAD_MAX_WEIGHT = ["nan", "inf", "-inf", "-0.5", "0", "-0", "1.5", "1.0000001", "abc", "",
                  "1e-400", "0x1p-1", "0.5,0.6"]  # fmt: skip
BAD_MAX_MODELS = ["0", "-1", "2.5", "abc", "", "1e3", "nan", "0x2"]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``convexmix ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error: " in lines[0], err
    assert "Traceback" not in err, err


def save(prob: Problem, tmp: Path) -> tuple[Path, Path]:
    """The problem's predictions (in their dtype) and targets as .npy files."""
    preds, targets = tmp / "p.npy", tmp / "y.npy"
    np.save(preds, np.asarray(prob.predictions))
    np.save(targets, np.asarray(prob.targets))
    return preds, targets


def option_values(K: int) -> st.SearchStrategy[tuple[str | None, str | None]]:
    """``--max-weight`` and ``--max-models`` strings (None: the option left out)."""
    weight = st.one_of(
        st.none(),
        st.sampled_from([repr(1.0 / K), "1", "1.0", "0.5", "0.25"]),
        st.floats(0.01, 1.0).map(repr),
        st.sampled_from(BAD_MAX_WEIGHT),
    )
    models = st.one_of(
        st.none(),
        st.integers(1, K + 2).map(str),
        st.sampled_from(["1", "10000000000000000000000"]),
        st.sampled_from(BAD_MAX_MODELS),
    )
    return st.tuples(weight, models)


def parse_weight(text: str | None) -> float | None:
    """The ``--max-weight`` that the CLI accepts (a finite number in (0, 1]), or raise."""
    if text is None:
        return None
    value = float(text)  # ValueError: refused
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(text)
    return value


def parse_models(text: str | None) -> int | None:
    if text is None:
        return None
    value = int(text)  # ValueError: refused
    if value < 1:
        raise ValueError(text)
    return value


@settings(max_examples=max(10, settings().max_examples // 2))
@given(prob=problems(), data=st.data())
def test_ensemble_honours_the_constraints_or_fails_cleanly(
    prob: Problem, data: st.DataObject
) -> None:
    mw_text, mm_text = data.draw(option_values(prob.K))
    n_boot = data.draw(st.sampled_from([0, 0, 2]))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        preds, targets = save(prob, tmp)
        out = tmp / "w.json"
        argv = ["ensemble", "--predictions", str(preds), "--targets", str(targets),
                "--loss", prob.loss, "--size", "3", "--quiet", "--out", str(out)]  # fmt: skip
        if mw_text is not None:
            argv += [f"--max-weight={mw_text}"]
        if mm_text is not None:
            argv += [f"--max-models={mm_text}"]
        if n_boot:
            argv += ["--bootstrap", str(n_boot)]
        code, _, err = run_main(argv)
        try:
            mw, mm = parse_weight(mw_text), parse_models(mm_text)
        except ValueError:
            event("refused: a bad option")
            assert code == 2, (code, err)
            assert_one_error_line(err)
            assert "--max-" in err, err
            assert not out.exists()
            return
        if prob.valid is False or not feasible(prob.K, mw, mm):
            event("refused: " + ("NaN/inf" if prob.valid is False else "infeasible"))
            assert code == 2, (code, err)
            assert_one_error_line(err)
            assert not out.exists()
            return
        if prob.valid is None and code == 2:
            event("refused: the loss overflows")
            assert_one_error_line(err)
            assert "the loss is not finite" in err, err
            assert not out.exists()
            return
        event(f"written ({'bootstrap' if n_boot else 'no bootstrap'})")
        assert code == 0, err
        saved = json.loads(out.read_text())
        w = check_weights(np.array(saved["weights"]), prob.K, mw, mm)
        assert saved["max_weight"] == mw
        assert saved["max_models"] == mm
        ref = fit_weights(
            np.asarray(prob.predictions), np.asarray(prob.targets), loss=prob.loss,
            max_weight=mw, max_models=mm,
        )  # fmt: skip
        np.testing.assert_allclose(w, np.asarray(ref.weights), rtol=0, atol=1e-15)
        if n_boot:
            draws = np.array(saved["bootstrap"]["draws"], dtype=np.float64)
            assert draws.shape == (n_boot, prob.K)
            for row in draws:
                check_weights(row, prob.K, mw, mm)
            hi = np.array(saved["bootstrap"]["hi"], dtype=np.float64)
            if mw is not None:
                assert (hi <= mw + 1e-12).all()
        # blend applies exactly the saved weights
        blended = tmp / "b.npy"
        code, _, err = run_main(["blend", "--weights", str(out), "--predictions", str(preds),
                                 "--out", str(blended), "--quiet"])  # fmt: skip
        assert code == 0, err
        p = np.asarray(prob.predictions)
        p64 = p.astype(np.float64)
        exact = np.tensordot(w, p64, axes=1)  # the saved weights' blend, in float64
        # the blend runs in the predictions' dtype: within a few of its ulps of sum |w p|
        # (float32 values of 1e5 that cancel to 1e3 round by 1e-2, beyond any relative bound)
        eps, tiny = np.finfo(p.dtype).eps, np.finfo(p.dtype).smallest_subnormal
        bound = 2 * prob.K * (eps * np.tensordot(w, np.abs(p64), axes=1) + tiny)
        err = np.abs(np.load(blended).astype(np.float64) - exact)
        assert (err <= bound).all(), (err.max(), bound[err.argmax()])


@pytest.mark.parametrize(
    ("option", "value"),
    [("--max-weight", v) for v in BAD_MAX_WEIGHT] + [("--max-models", v) for v in BAD_MAX_MODELS],
)
def test_a_bad_constraint_is_one_line(option: str, value: str, tmp_path: Path) -> None:
    prob = _fixed_problem()
    preds, targets = save(prob, tmp_path)
    out = tmp_path / "w.json"
    code, _, err = run_main(["ensemble", "--predictions", str(preds), "--targets", str(targets),
                             f"{option}={value}", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 2
    assert_one_error_line(err)
    assert option in err
    assert not out.exists()


def _fixed_problem() -> Problem:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 40, 3)) * 2
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    y = rng.integers(0, 3, 40)
    return Problem("multiclass", p, y.astype(np.float64), "log_loss", None, True, p, y, None)


# ------------------------------------------------------------------------ a real process


@pytest.mark.parametrize(
    ("options", "nan", "message"),
    [
        (["--max-weight", "0.5", "--max-models", "1", "--bootstrap", "2"], False, "infeasible"),
        (["--max-weight", "nan"], False, "--max-weight"),
        (["--max-weight", "0.5"], True, "must be finite"),
        (["--max-weight", "0.4", "--max-models", "3", "--bootstrap", "2"], False, None),
    ],
)
def test_console_script(options: list[str], nan: bool, message: str | None, tmp_path: Path) -> None:
    """``python -m convexmix ensemble``: exit 2 with one line and no file, or exit 0 with a
    file that honours the constraints."""
    prob = _fixed_problem()
    p = np.array(prob.predictions)
    if nan:
        p[1, 3, 0] = np.nan
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y.npy", np.asarray(prob.targets))
    out = tmp_path / "w.json"
    args = [sys.executable, "-m", "convexmix", "ensemble", "--predictions",
            str(tmp_path / "p.npy"), "--targets", str(tmp_path / "y.npy"), "--size", "3",
            *options, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)
    if message is None:
        assert proc.returncode == 0, proc.stderr
        saved: dict[str, Any] = json.loads(out.read_text())
        check_weights(np.array(saved["weights"]), 3, 0.4, 3)
        for row in saved["bootstrap"]["draws"]:
            check_weights(np.array(row), 3, 0.4, 3)
        return
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr)
    assert re.search(message, proc.stderr), proc.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.npy", "y.npy"]  # no temp file


# ------------------------------------------------------------------------ blend and score


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"weights": [0.6, 0.4, 0.0]}, r"max_weight=0.5"),
        ({"weights": [0.2, 0.3, 0.5], "max_weight": 0.5, "max_models": 2}, r"max_models=2"),
        ({"max_weight": "0.5"}, r"'max_weight' must be"),
        ({"max_weight": 1.5}, r"'max_weight' must be"),
        ({"max_weight": 0.0}, r"'max_weight' must be"),
        ({"max_weight": 10**400}, r"'max_weight' must be"),
        ({"max_models": 0}, r"'max_models' must be"),
        ({"max_models": 1.5}, r"'max_models' must be"),
        ({"max_models": True}, r"'max_models' must be"),
    ],
)
@pytest.mark.parametrize("command", ["blend", "score"])
def test_blend_and_score_recheck_the_files_constraints(
    command: str, edit: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """A weights file records the constraints it was fitted under; blend and score (and
    load_weights) refuse a file whose weights break them, or whose constraints are not
    valid, with one line and no output file, rather than apply a blend the fit never
    allowed."""
    prob = _fixed_problem()
    preds, targets = save(prob, tmp_path)
    w_json = tmp_path / "w.json"
    code, _, err = run_main(["ensemble", "--predictions", str(preds), "--targets", str(targets),
                             "--max-weight", "0.5", "--max-models", "3", "--out", str(w_json),
                             "--quiet", "--size", "3"])  # fmt: skip
    assert code == 0, err
    data = json.loads(w_json.read_text())
    w_json.write_text(json.dumps({**data, **edit}))
    out = tmp_path / "b.npy"
    argv = [command, "--weights", str(w_json), "--predictions", str(preds)]
    argv += ["--out", str(out), "--quiet"] if command == "blend" else ["--targets", str(targets)]
    code, _, err = run_main(argv)
    assert code == 2, err
    assert_one_error_line(err)
    assert re.search(message, err), err
    assert not out.exists()
