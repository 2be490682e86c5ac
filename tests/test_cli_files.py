"""What the CLI's commands write and read: ``--out`` through symlinks, never over a
non-regular file or an input, keeping the mode, atomically; edited weights files and
out-of-range arguments as one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convexmix as cx
from convexmix import _files
from convexmix.cli import main

pytest.importorskip("rich")


def problem(tmp: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    logits = np.stack([np.eye(2)[y] * a + rng.standard_normal((80, 2)) for a in (1.0, 2.0, 0.5)])
    p = np.exp(logits)
    np.save(tmp / "p.npy", p / p.sum(-1, keepdims=True))
    np.save(tmp / "y.npy", y)
    return tmp / "p.npy", tmp / "y.npy"


def ensemble(
    tmp: Path, out: Path | str, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    preds, targets = problem(tmp)
    code = main(["ensemble", "--predictions", str(preds), "--targets", str(targets),
                 "--out", str(out), "--size", "5", "--quiet", *extra])  # fmt: skip
    return code, capsys.readouterr().err


def one_error(err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convexmix: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ --out


def test_out_writes_through_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "w.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    code, err = ensemble(tmp_path, link, capsys)
    assert code == 0, err
    assert link.is_symlink()
    assert os.readlink(link) == str(target)
    assert json.loads(target.read_text())["weights"]
    # a dangling link: its target is created
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(real_dir / "new.json")
    assert ensemble(tmp_path, dangling, capsys)[0] == 0
    assert dangling.is_symlink()
    assert json.loads((real_dir / "new.json").read_text())["weights"]
    assert temporaries(real_dir) == temporaries(tmp_path) == []


def test_out_refuses_what_is_not_a_regular_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "folder.json"
    folder.mkdir()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    link_to_fifo = tmp_path / "to_fifo.json"
    link_to_fifo.symlink_to(fifo)
    for path, kind in ((folder, "a directory"), (fifo, "a FIFO"), (link_to_fifo, "a FIFO")):
        code, err = ensemble(tmp_path, path, capsys)
        assert code == 2
        one_error(err, f"cannot write .*: it is {kind}, not a regular file")
    assert folder.is_dir()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert link_to_fifo.is_symlink()
    assert temporaries(tmp_path) == []


def test_devices_are_refused_before_anything_is_written() -> None:
    """A character device (checked without a command, so that no test ever writes near
    /dev/null, even as root)."""
    with pytest.raises(cx.ConvexMixError, match="it is a device, not a regular file"):
        _files.check_output(os.devnull)
    entered = []

    def write() -> None:
        with _files.atomic_path(os.devnull) as tmp:  # pragma: no cover - never entered
            entered.append(tmp)

    with pytest.raises(cx.ConvexMixError, match="it is a device"):
        write()
    assert entered == []


def test_out_keeps_the_mode_of_the_file_it_replaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w.json"
    out.write_text("old")
    out.chmod(0o600)
    assert ensemble(tmp_path, out, capsys)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    out.chmod(0o640)
    assert ensemble(tmp_path, out, capsys)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    out.chmod(0o444)  # read-only: replaced (the folder is writable), and still read-only
    assert ensemble(tmp_path, out, capsys)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o444
    assert json.loads(out.read_text())["weights"]
    fresh = tmp_path / "fresh.json"
    assert ensemble(tmp_path, fresh, capsys)[0] == 0
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~mask


def test_out_refuses_an_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The predictions, the targets, or the weights, by any path: a symlink, a hard link."""
    preds, targets = problem(tmp_path)
    before = preds.read_bytes(), targets.read_bytes()
    (tmp_path / "preds_link.npy").symlink_to(preds)
    os.link(targets, tmp_path / "hard.npy")
    for out in (preds, targets, tmp_path / "preds_link.npy", tmp_path / "hard.npy"):
        code, err = ensemble(tmp_path, out, capsys)
        assert code == 2
        one_error(err, "is one of the command's input files")
    os.link(targets, tmp_path / "hard.png")
    code = main(["ensemble", "--predictions", str(preds), "--targets", str(targets),
                 "--plot", str(tmp_path / "hard.png"), "--quiet"])  # fmt: skip
    assert code == 2
    one_error(capsys.readouterr().err, "is one of the command's input files")
    assert (preds.read_bytes(), targets.read_bytes()) == before
    # blend: neither the weights file nor a predictions file
    w = tmp_path / "w.json"
    assert ensemble(tmp_path, w, capsys)[0] == 0
    weights = w.read_bytes()
    for out in (w, preds):
        code = main(["blend", "--weights", str(w), "--predictions", str(preds), "--out", str(out)])
        assert code == 2
        one_error(capsys.readouterr().err, "is one of the command's input files")
    assert w.read_bytes() == weights
    assert preds.read_bytes() == before[0]


def test_out_and_plot_cannot_name_one_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w.png"
    code, err = ensemble(tmp_path, out, capsys, "--plot", str(out))
    assert code == 2
    one_error(err, "name the same file")
    assert not out.exists()


def test_an_interrupted_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "w.json"
    target.write_text("old")

    def interrupted() -> None:
        with _files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()
    assert target.read_text() == "old"
    assert temporaries(tmp_path) == []
    # and a killed process (no cleanup at all) leaves the old file too: the data only
    # reaches the target by a rename
    script = (
        "import os, sys\n"
        "from convexmix._files import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == 9
    assert target.read_text() == "old"


def test_blend_out_is_atomic_and_keeps_its_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = tmp_path / "w.json"
    assert ensemble(tmp_path, w, capsys)[0] == 0
    out = tmp_path / "blend.csv"
    out.write_text("old")
    out.chmod(0o600)
    link = tmp_path / "blend_link.csv"
    link.symlink_to(out)
    code = main(["blend", "--weights", str(w), "--predictions", str(tmp_path / "p.npy"),
                 "--out", str(link), "--quiet"])  # fmt: skip
    assert code == 0
    assert link.is_symlink()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().startswith("class_0,class_1\n")


# ------------------------------------------------------------------ edited weights files

EDITS: dict[str, tuple[object, str]] = {
    # key: (value written, the message expected)
    "n_iter=abc": ("abc", "'n_iter' must be an int >= 0; got 'abc'"),
    "n_iter=[1]": ([1], r"'n_iter' must be an int >= 0; got \[1\]"),
    "n_iter=1e400": (float("inf"), "'n_iter' must be an int >= 0; got inf"),
    "n_iter=NaN": (float("nan"), "'n_iter' must be an int >= 0; got nan"),
    "n_iter=-1": (-1, "'n_iter' must be an int >= 0"),
    "n_iter=true": (True, "'n_iter' must be an int >= 0; got True"),
    "n_iter=2**70": (2**70, "'n_iter' must be an int >= 0"),
    "gap=str": ("small", "'gap' must be a number"),
    "gap=10**400": (10**400, "'gap' must be a number in float range"),
    "converged=yes": ("yes", "'converged' must be true or false"),
    "map=3": (3, "'map' must be one of"),
    "map=unknown": ("nope", "'map' must be one of"),
    "method=[]": ([], "'method' must be a string"),
    "loss=hinge": ("hinge", "'loss' must be one of log_loss, mse"),
    "regularization=-1": (-1, "'regularization' must be a number >= 0"),
    "regularization=NaN": (float("nan"), "'regularization' must be a finite number"),
    "losses=[]": ([], "'losses' must be an object of numbers"),
    "sample_shape=[0]": ([0], "'sample_shape' must be"),
    "sample_shape=str": ("3", "'sample_shape' must be"),
    "models=[1, 2, 3]": ([1, 2, 3], "'models' must be 3 names"),
    "models=dup": (["a", "a", "b"], "'models' names a model twice"),
    "models_named=1": (1, "'models_named' must be true or false"),
    "weights=[str]": (["0.5", "0.5"], "'weights' must be a list of numbers"),
    "weights=1e400": ([float("inf"), 0.0, 0.0], "must be numbers >= 0 that sum to 1"),
    "weights=10**400": ([10**400, 0, 0], "must be numbers >= 0 that sum to 1"),
    "weights=NaN": ([float("nan"), 0.5, 0.5], "must be numbers >= 0 that sum to 1"),
    "weights=nested": ([[0.5], [0.5]], "'weights' must be a list of numbers"),
    "weights=dict": ({"a": 1.0}, "expected a JSON object with a 'weights' list"),
}


def edited(tmp: Path, key: str, value: object) -> Path:
    name = key.split("=")[0]
    data: dict[str, object] = {"weights": [0.25, 0.25, 0.5], "models": ["a", "b", "c"]}
    if name == "losses_value":
        data["losses"] = {"convexmix": value}
    else:
        data[name] = value
    path = tmp / "edited.json"
    path.write_text(json.dumps(data))  # writes NaN, Infinity and huge ints as Python does
    return path


@pytest.mark.parametrize("key", list(EDITS))
def test_edited_weights_files_are_one_line_and_exit_2(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value, message = EDITS[key]
    path = edited(tmp_path, key, value)
    np.save(tmp_path / "p.npy", np.full((3, 5), 0.5))
    code = main(["blend", "--weights", str(path), "--predictions", str(tmp_path / "p.npy"),
                 "--names", "a", "b", "c", "--out", str(tmp_path / "b.npy")])  # fmt: skip
    assert code == 2
    one_error(capsys.readouterr().err, re.escape(str(path)) + ".*" + message)
    with pytest.raises(cx.ConvexMixError, match=message):
        cx.ensemble.load_weights(path)
    assert not (tmp_path / "b.npy").exists()


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"weights": [0.5, 0.5], "losses": {"convexmix": "x"}}',
     "\x00\x01", "[]", '{"weights": []}', "NaN"],
)  # fmt: skip
def test_malformed_weights_files(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    np.save(tmp_path / "p.npy", np.full((2, 5), 0.5))
    code = main(["blend", "--weights", str(path), "--predictions", str(tmp_path / "p.npy"),
                 "--out", str(tmp_path / "b.npy")])  # fmt: skip
    assert code == 2
    one_error(capsys.readouterr().err, re.escape(str(path)))


def test_a_complete_file_from_ensemble_still_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = tmp_path / "w.json"
    assert ensemble(tmp_path, w, capsys, "--bootstrap", "3")[0] == 0
    blend = cx.ensemble.load_weights(w)
    data = json.loads(w.read_text())
    assert blend.n_iter == data["n_iter"]
    assert blend.converged is data["converged"]
    assert blend.models == data["models"]


# -------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "args",
    [
        ["ensemble", "--seed", str(2**70)],
        ["ensemble", "--seed", "-1"],
        ["ensemble", "--bootstrap", "-3"],
        ["ensemble", "--level", "nan"],
        ["ensemble", "--level", "1"],
        ["ensemble", "--tol", "inf"],
        ["ensemble", "--max-weight", "nan"],
        ["ensemble", "--max-models", "0"],
        ["ensemble", "--size", "0"],
        ["ensemble", "--max-iter", "1e3"],
        ["ensemble", "--regularization", "-1"],
        ["seeds", "--seed", str(2**70)],
        ["demo", "--seed", str(2**64)],
    ],
)
def test_out_of_range_arguments_are_one_line_and_exit_2(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preds, targets = problem(tmp_path)
    files = ["--predictions", str(preds), "--targets", str(targets)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, *(files if args[0] == "ensemble" else [])])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"convexmix {args[0]}: error: argument {args[1]}" in lines[0]


def test_a_missing_extra_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MissingExtraError is a ConvexMixError: the CLI prints its pip line."""
    import builtins

    real = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    preds, targets = problem(tmp_path)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for mod in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, mod)
    code = main(["ensemble", "--predictions", str(preds), "--targets", str(targets),
                 "--plot", str(tmp_path / "w.png"), "--quiet"])  # fmt: skip
    assert code == 2
    one_error(
        capsys.readouterr().err, r'plotting needs matplotlib: pip install "convexmix\[plot\]"'
    )
