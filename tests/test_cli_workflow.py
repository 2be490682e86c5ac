"""The CLI's workflow: fit on validation predictions (`ensemble --out`), apply the weights
to the test predictions by model name (`blend`), and score them (`score`); bootstrap
draws of the constrained fit; the help texts; the command registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convexmix as cx
from convexmix.cli import COMMANDS, Command, build_parser, main

pytest.importorskip("rich")

K, C = 4, 3
NAMES = ["lr", "nb", "tree", "knn"]


def models(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, n, C) class probabilities of K models of different quality, and labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    logits = np.stack(
        [np.eye(C)[y] * a + rng.standard_normal((n, C)) for a in (1.0, 1.6, 1.2, 0.7)]
    )
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True), y


def save_models(folder: Path, P: np.ndarray, y: np.ndarray) -> list[str]:
    folder.mkdir(exist_ok=True)
    files = []
    for name, p in zip(NAMES, P, strict=True):
        np.save(folder / f"{name}.npy", p)
        files.append(str(folder / f"{name}.npy"))
    np.save(folder / "y.npy", y)
    return files


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fitted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    """Weights fitted on per-model validation files, and the test split's files."""
    Pv, yv = models(400, 0)
    Pt, yt = models(300, 1)
    val = save_models(tmp_path / "val", Pv, yv)
    test = save_models(tmp_path / "test", Pt, yt)
    w = tmp_path / "w.json"
    code, _, err = run(
        ["ensemble", "--predictions", *val, "--targets", str(tmp_path / "val" / "y.npy"),
         "--out", str(w), "--quiet", "--size", "10"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    return {"w": w, "val": val, "test": test, "Pv": Pv, "yv": yv, "Pt": Pt, "yt": yt}


def by_name(w: Path) -> dict[str, float]:
    data = json.loads(w.read_text())
    return dict(zip(data["models"], data["weights"], strict=True))


def one_error(err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convexmix: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


# ------------------------------------------------------------------ names and matching


def test_weights_file_records_the_names(fitted: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    data = json.loads(fitted["w"].read_text())  # type: ignore[attr-defined]
    assert data["models"] == NAMES
    assert data["models_named"] is True
    assert cx.ensemble.load_weights(fitted["w"]).models == NAMES  # type: ignore[arg-type]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]])
def test_blend_matches_files_by_name_in_any_order(
    fitted: dict,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    order: list[int],
) -> None:
    """The files of the test split, in any order, give the blend with each model's own
    weight (the reference: the weights looked up by name, summed in numpy)."""
    test, Pt = fitted["test"], fitted["Pt"]
    out = tmp_path / "blend.npy"
    files = [test[k] for k in order]  # type: ignore[index]
    code, _, err = run(["blend", "--weights", str(fitted["w"]), "--predictions", *files,
                        "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    w = by_name(fitted["w"])  # type: ignore[arg-type]
    expected = sum(w[name] * Pt[k] for k, name in enumerate(NAMES))  # type: ignore[index]
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-13, atol=1e-15)
    # a stacked array in a shuffled order, named with --names, gives the same blend
    np.save(tmp_path / "stack.npy", np.stack([Pt[k] for k in order]))  # type: ignore[index]
    code, _, err = run(["blend", "--weights", str(fitted["w"]), "--predictions",
                        str(tmp_path / "stack.npy"), "--names", *[NAMES[k] for k in order],
                        "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-13, atol=1e-15)


def test_blend_refuses_files_that_do_not_match(
    fitted: dict,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    test = fitted["test"]
    w = str(fitted["w"])
    out = tmp_path / "blend.npy"
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "svm.npy", np.load(test[0]))  # type: ignore[index]
    np.save(tmp_path / "stack.npy", fitted["Pt"])
    cases = {
        "a model missing": ([*test[:3]], [], "holds weights for 4 models .*hold 3"),  # type: ignore[index]
        "an unknown model": ([*test[1:], str(other / "svm.npy")], [],
                             "not in the fit: svm; missing: lr"),  # type: ignore[index]
        "a file twice": ([*test[:3], test[0]], [], "given twice"),  # type: ignore[index]
        "duplicated names": (test, ["--names", "lr", "lr", "nb", "tree"],
                             r"appear more than once"),
        "names of another count": (test, ["--names", "lr", "nb"], "got 2 names for 4 models"),
        "unnamed stack": ([str(tmp_path / "stack.npy")], [], "name no models.*--names"),
        "wrong names": (test, ["--names", "a", "b", "c", "d"], "not in the fit: a, b, c, d"),
    }  # fmt: skip
    for case, (files, extra, pattern) in cases.items():
        code, _, err = run(
            ["blend", "--weights", w, "--predictions", *files, *extra, "--out", str(out)], capsys
        )
        assert code == 2, case
        one_error(err, pattern)
        assert not out.exists(), case


def test_weights_without_names_apply_by_position(
    fitted: dict,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file that records no names (an older convexmix, or a hand-written one) is applied
    in the order given, with a warning; a fit on one stacked array (placeholder names)
    applies to another stacked array by position, without one."""
    Pt = fitted["Pt"]
    old = tmp_path / "old.json"
    weights = [0.1, 0.2, 0.3, 0.4]
    old.write_text(json.dumps({"weights": weights}))
    out = tmp_path / "blend.npy"
    code, _, err = run(["blend", "--weights", str(old), "--predictions", *fitted["test"],
                        "--out", str(out)], capsys)  # type: ignore[misc]  # fmt: skip
    assert code == 0
    assert "records no model names" in err
    expected = sum(wk * p for wk, p in zip(weights, Pt, strict=True))  # type: ignore[call-overload]
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-13)
    # fitted on a stacked array: placeholder names, matched by position
    np.save(tmp_path / "val.npy", fitted["Pv"])
    np.save(tmp_path / "test.npy", Pt)
    np.save(tmp_path / "yv.npy", fitted["yv"])
    stacked = tmp_path / "stacked.json"
    fit = ["ensemble", "--predictions", str(tmp_path / "val.npy"), "--targets"]
    code, _, _ = run([*fit, str(tmp_path / "yv.npy"), "--out", str(stacked), "--quiet"], capsys)
    assert code == 0
    assert json.loads(stacked.read_text())["models_named"] is False
    code, _, err = run(["blend", "--weights", str(stacked), "--predictions",
                        str(tmp_path / "test.npy"), "--out", str(out)], capsys)  # fmt: skip
    assert code == 0
    assert "warning" not in err
    w = json.loads(stacked.read_text())["weights"]
    np.testing.assert_allclose(np.load(out), np.tensordot(w, Pt, axes=1), rtol=1e-13)


def test_names_option_and_colliding_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--names names the models; files with the same stem in different folders get the
    folder in their names rather than a counter that depends on the order."""
    P, y = models(200, 3)
    np.save(tmp_path / "y.npy", y)
    files = []
    for k, run_name in enumerate(["a", "b", "c", "d"]):
        (tmp_path / run_name).mkdir()
        np.save(tmp_path / run_name / "pred.npy", P[k])
        files.append(str(tmp_path / run_name / "pred.npy"))
    out = tmp_path / "w.json"
    base = ["ensemble", "--predictions", *files, "--targets", str(tmp_path / "y.npy"), "--quiet"]
    assert run([*base, "--out", str(out)], capsys)[0] == 0
    assert json.loads(out.read_text())["models"] == ["a/pred", "b/pred", "c/pred", "d/pred"]
    assert run([*base, "--names", *NAMES, "--out", str(out)], capsys)[0] == 0
    assert json.loads(out.read_text())["models"] == NAMES


# ------------------------------------------------------------------------------- score


def test_score_against_independent_references(
    fitted: dict,  # type: ignore[type-arg]
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On the validation files the blend's log-loss is the fit's own loss; on the test
    files each figure equals a numpy computation."""
    w = str(fitted["w"])
    code, out, err = run(["score", "--weights", w, "--predictions", *fitted["val"],
                          "--targets", str(Path(fitted["val"][0]).parent / "y.npy"), "--json"],
                         capsys)  # type: ignore[index,arg-type]  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    saved = json.loads(Path(w).read_text())
    assert report["blend"]["log_loss"] == pytest.approx(saved["losses"]["convexmix"], rel=1e-12)
    assert report["equal_weights"]["log_loss"] == pytest.approx(
        saved["losses"]["equal_weights"], rel=1e-12
    )
    # the test split, files in another order
    Pt, yt = fitted["Pt"], fitted["yt"]
    test = list(reversed(fitted["test"]))  # type: ignore[call-overload]
    ydir = Path(test[0]).parent / "y.npy"
    code, out, err = run(
        ["score", "--weights", w, "--predictions", *test, "--targets", str(ydir), "--json"],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    weights = by_name(fitted["w"])  # type: ignore[arg-type]
    blend = sum(weights[n] * Pt[k] for k, n in enumerate(NAMES))  # type: ignore[index]
    onehot = np.eye(C)[yt]  # type: ignore[index]

    def ref(p: np.ndarray) -> dict[str, float]:
        return {
            "log_loss": float(-np.log(p[np.arange(len(yt)), yt]).mean()),  # type: ignore[arg-type]
            "brier": float(((p - onehot) ** 2).sum(-1).mean()),
            "accuracy": float((p.argmax(-1) == yt).mean()),
        }

    def close(got: dict[str, float], want: dict[str, float]) -> None:
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-10), key

    close(report["blend"], ref(blend))
    close(report["equal_weights"], ref(Pt.mean(0)))  # type: ignore[attr-defined]
    assert list(report["models"]) == NAMES
    for k, name in enumerate(NAMES):
        close(report["models"][name], ref(Pt[k]))  # type: ignore[index]
    assert report["weights"] == weights
    # the table shows the same numbers
    code, out, _ = run(
        ["score", "--weights", w, "--predictions", *test, "--targets", str(ydir)], capsys
    )
    assert code == 0
    for word in ("convexmix", "equal weights", *NAMES, "log-loss", "brier", "accuracy"):
        assert word in out
    assert f"{report['blend']['log_loss']:.6f}" in out


def test_score_regression(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = np.random.default_rng(4)
    P = g.standard_normal((3, 150)) * 50 + 100
    y = 0.3 * P[0] + 0.7 * P[1] + g.standard_normal(150)
    np.save(tmp_path / "p.npy", P)
    np.save(tmp_path / "y.npy", y)
    w = tmp_path / "w.json"
    base = ["--predictions", str(tmp_path / "p.npy")]
    assert run(["ensemble", *base, "--targets", str(tmp_path / "y.npy"), "--loss", "mse",
                "--out", str(w), "--quiet"], capsys)[0] == 0  # fmt: skip
    code, out, err = run(
        ["score", "--weights", str(w), *base, "--targets", str(tmp_path / "y.npy"), "--json"],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["loss"] == "mse"
    weights = np.array(json.loads(w.read_text())["weights"])
    assert report["blend"] == {"mse": pytest.approx(float(((weights @ P - y) ** 2).mean()))}
    for k in range(3):
        assert report["models"][f"model {k}"]["mse"] == pytest.approx(((P[k] - y) ** 2).mean())


def test_score_errors_are_one_line(
    fitted: dict,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    np.save(tmp_path / "short.npy", np.zeros(10, dtype=np.int64))
    code, _, err = run(["score", "--weights", str(fitted["w"]), "--predictions",
                        *fitted["test"], "--targets", str(tmp_path / "short.npy")], capsys)  # type: ignore[misc]  # fmt: skip
    assert code == 2
    one_error(err, "N=300")


# --------------------------------------------------------------- constrained bootstrap


@pytest.mark.parametrize(
    "limits", [["--max-models", "1"], ["--max-weight", "0.4"], ["--max-weight", "0.5",
                                                                "--max-models", "2"]]
)  # fmt: skip
def test_bootstrap_draws_the_constrained_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], limits: list[str]
) -> None:
    """Every draw honours --max-weight/--max-models, each is the library's constrained fit
    with that draw's sample weights, and the intervals keep the constraints' structure."""
    P, y = models(300, 5)
    np.save(tmp_path / "p.npy", P)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "w.json"
    code, _, err = run(["ensemble", "--predictions", str(tmp_path / "p.npy"), "--targets",
                        str(tmp_path / "y.npy"), *limits, "--bootstrap", "6", "--out", str(out),
                        "--quiet", "--size", "5"], capsys)  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    kw: dict[str, float | int] = {}
    if "--max-models" in limits:
        kw["max_models"] = int(limits[limits.index("--max-models") + 1])
    if "--max-weight" in limits:
        kw["max_weight"] = float(limits[limits.index("--max-weight") + 1])
    cap, k = kw.get("max_weight", 1.0), kw.get("max_models", K)
    draws = np.array(data["bootstrap"]["draws"])
    assert draws.shape == (6, K)
    np.testing.assert_allclose(draws.sum(1), 1.0, atol=1e-12)
    assert (draws <= cap + 1e-12).all()
    assert ((draws > 0).sum(1) <= k).all()
    hi = np.array(data["bootstrap"]["hi"])
    assert (hi <= cap + 1e-12).all()
    if "max_models" in kw and kw["max_models"] == 1:
        # one model per draw: the reported model's interval is [1, 1] when every draw agrees
        assert set(np.flatnonzero(draws.max(0) > 0)) >= set(np.flatnonzero(data["weights"]))
    # the library's bootstrap, and its rows against fit_weights with the draw's weights
    boot = cx.ensemble.bootstrap(P, y, n=6, seed=0, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(draws, np.asarray(boot.weights), atol=1e-12)
    for i in (0, 5):
        ref = cx.ensemble.fit_weights(P, y, sample_weight=boot.sample_weights[i], **kw)  # type: ignore[arg-type]
        np.testing.assert_allclose(np.asarray(boot.weights)[i], np.asarray(ref.weights), atol=1e-9)
    np.testing.assert_allclose(data["weights"], np.asarray(boot.fit.weights), atol=1e-12)


def test_library_bootstrap_honours_the_constraints() -> None:
    """Drawn problems: every bootstrap row is feasible, with at most k non-zeros."""
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        Kt = 3 + trial
        P = torch.softmax(torch.randn(Kt, 80, 2, generator=g, dtype=torch.float64) * 2, -1)
        y = torch.randint(0, 2, (80,), generator=g)
        cap = 1.0 / (Kt - 1) + 0.1 * trial
        boot = cx.ensemble.bootstrap(P, y, n=5, seed=trial, max_weight=cap, max_models=Kt - 1)
        w = boot.weights
        torch.testing.assert_close(w.sum(1), torch.ones(5, dtype=torch.float64))
        assert bool((w <= cap + 1e-12).all() and (w >= 0).all())
        assert bool(((w > 0).sum(1) <= Kt - 1).all())
        lo, hi = boot.interval(0.9)
        assert bool((hi <= cap + 1e-12).all() and (lo >= 0).all())
    with pytest.raises(cx.ConvexMixError, match="infeasible"):
        cx.ensemble.bootstrap(P, y, n=2, max_weight=0.1)


# ------------------------------------------------------------------- help and registry


def test_every_command_has_a_description_and_defaults_in_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert {c.name for c in COMMANDS} >= {"ensemble", "blend", "score", "demo", "seeds", "info"}
    for command in COMMANDS:
        assert command.description, command.name
        assert command.help, command.name
        with pytest.raises(SystemExit) as exit_:
            main([command.name, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert " ".join(command.description.split())[:40] in text, command.name
    with pytest.raises(SystemExit):
        main(["ensemble", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: log_loss)", "(default: 50)", "(default: 1e-10)",
                    "(default: 200)", "(default: 0.9)", "(default: 0)"):  # fmt: skip
        assert default in text, default
    assert "log_loss: class probabilities" in text  # --loss has help text
    assert "(default: None)" not in text
    assert "(default: False)" not in text


def test_a_registered_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """A new subcommand is one Command entry: its arguments, its run, its errors."""

    def add(p: object) -> None:
        p.add_argument("--n", type=int, default=3, help="how many")  # type: ignore[attr-defined]

    def go(args: object) -> int:
        if args.n < 0:  # type: ignore[attr-defined]
            raise cx.ConvexMixError("n must be >= 0")
        print("hello " * args.n)  # type: ignore[attr-defined]
        return 0

    extra = Command("hello", "say hello", "Say hello n times.", add, go, needs_rich=False)
    COMMANDS.append(extra)
    try:
        assert main(["hello", "--n", "2"]) == 0
        assert capsys.readouterr().out.split() == ["hello", "hello"]
        assert main(["hello", "--n", "-1"]) == 2
        assert capsys.readouterr().err == "convexmix: error: n must be >= 0\n"
        assert "hello" in build_parser().format_help()
    finally:
        COMMANDS.remove(extra)


def test_the_workflow_lines_of_the_readme_and_the_guide_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's and docs/ensemble.md's fit -> blend -> score lines, on files of the
    names they use: the blend equals the weights applied by name."""
    import shlex

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    Pv, yv = models(300, 6)
    Pt, yt = models(200, 7)
    names = ["lr", "nb", "tree"]
    for folder, P, y in (("", Pv, yv), ("val", Pv, yv), ("test", Pt, yt)):
        (tmp_path / folder).mkdir(exist_ok=True)
        for name, p in zip(names, P[:3], strict=True):
            np.save(tmp_path / folder / f"{name}.npy", p)
        np.save(tmp_path / folder / "y.npy", y)
    for doc in ("README.md", "docs/ensemble.md"):
        text = (root / doc).read_text()
        start = text.index(
            "convexmix ensemble --predictions", text.index("blend --weights w.json") - 300
        )
        lines = [
            ln for ln in text[start:].split("```")[0].splitlines() if ln.startswith("convexmix ")
        ]
        assert [ln.split()[1] for ln in lines] == ["ensemble", "blend", "score"], doc
        for line in lines:
            assert (
                main(
                    [*shlex.split(line)[1:], "--quiet"]
                    if "ensemble" in line.split()[1]
                    else shlex.split(line)[1:]
                )
                == 0
            ), line
        capsys.readouterr()
        w = by_name(tmp_path / "w.json")
        expected = sum(w[n] * Pt[k] for k, n in enumerate(names))
        np.testing.assert_allclose(np.load(tmp_path / "blend.npy"), expected, rtol=1e-13)


def test_score_binary_probabilities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """(K, N) probabilities of class 1: log-loss, Brier and accuracy (class 1 above 0.5)."""
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 200)
    noise = 0.25 * rng.standard_normal((3, 200))
    P = np.clip(np.where(y == 1, 0.7, 0.3) + noise, 0.01, 0.99)
    np.save(tmp_path / "p.npy", P)
    np.save(tmp_path / "y.npy", y)
    w = tmp_path / "w.json"
    base = ["--predictions", str(tmp_path / "p.npy"), "--targets", str(tmp_path / "y.npy")]
    assert run(["ensemble", *base, "--out", str(w), "--quiet"], capsys)[0] == 0
    code, out, err = run(["score", "--weights", str(w), *base, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    b = np.array(json.loads(w.read_text())["weights"]) @ P
    assert report["blend"]["log_loss"] == pytest.approx(
        -np.log(np.where(y == 1, b, 1 - b)).mean(), rel=1e-12
    )
    assert report["blend"]["brier"] == pytest.approx(((b - y) ** 2).mean(), rel=1e-12)
    assert report["blend"]["accuracy"] == ((b > 0.5) == y).mean()
    assert report["models"]["model 2"]["accuracy"] == ((P[2] > 0.5) == y).mean()


@given(
    names=st.lists(
        st.text(alphabet="abcxyz/_ 0", min_size=1, max_size=6).filter(str.strip),
        min_size=1,
        max_size=7,
        unique=True,
    ),
    data=st.data(),
)
@settings(deadline=None)
def test_matching_by_name_is_the_permutation(names: list[str], data: st.DataObject) -> None:
    """Any order of the fitted names gives the index of each fitted model among the given
    ones; a renamed model is refused; unnamed fits match by position."""
    from convexmix import _io

    order = data.draw(st.permutations(range(len(names))))
    given = _io.Predictions(None, [names[i] for i in order], True)
    idx = _io.match_models(names, True, given, "w.json")
    assert [given.names[i] for i in idx] == names
    assert _io.match_models(names, False, given, "w.json") == list(range(len(names)))
    renamed = _io.Predictions(None, [*given.names[:-1], given.names[-1] + "!"], True)
    with pytest.raises(cx.ConvexMixError, match="do not match"):
        _io.match_models(names, True, renamed, "w.json")
    with pytest.raises(cx.ConvexMixError, match="--names"):
        _io.match_models(names, True, _io.Predictions(None, given.names, False), "w.json")
