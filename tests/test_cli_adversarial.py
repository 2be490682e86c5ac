"""The CLI on hostile files and outputs: one line on stderr, a non-zero exit, no partial file.

The CLI part of the adversarial suite: bad input files (missing, a
directory, corrupt .npy, binary or BOM CSV, header CSV, wrong shapes), unwritable outputs,
a write that fails midway, bad plot names and a closed output pipe.
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convexmix import _io
from convexmix.cli import main

K, N, C = 3, 60, 2


def make_problem(tmp: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, N)
    logits = np.stack([np.eye(C)[y] * a + rng.standard_normal((N, C)) for a in (1.0, 2.0, 0.5)])
    p = np.exp(logits)
    np.save(tmp / "p.npy", p / p.sum(-1, keepdims=True))
    np.save(tmp / "y.npy", y)
    return tmp / "p.npy", tmp / "y.npy"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["ensemble", *args, "--size", "5", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convexmix: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def bad_inputs(tmp: Path, preds: Path) -> dict[str, tuple[str, str]]:
    """name -> (a --predictions path, the expected message)."""
    (tmp / "dir.npy").mkdir()
    good = preds.read_bytes()
    (tmp / "truncated.npy").write_bytes(good[: len(good) // 2])
    (tmp / "header_only.npy").write_bytes(good[:6] + b"garbage")
    (tmp / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp / "header.csv").write_text("a,b\n")
    (tmp / "ragged.csv").write_text("0.5,0.5\n0.2\n")
    np.save(tmp / "three_d_one.npy", np.zeros((2, 2, 2, 2)))
    return {
        "missing": (str(tmp / "missing.npy"), "missing.npy: no such file"),
        "directory": (str(tmp / "dir.npy"), r"dir.npy: is a directory"),
        "truncated npy": (str(tmp / "truncated.npy"), r"truncated.npy: not a .npy array file"),
        "corrupt header": (str(tmp / "header_only.npy"), r"header_only.npy: not a .npy"),
        "binary csv": (str(tmp / "binary.csv"), r"binary.csv: not a text CSV file"),
        "header-only csv": (str(tmp / "header.csv"), r"header.csv: the file has a header but no"),
        "ragged csv": (str(tmp / "ragged.csv"), r"ragged.csv: the rows have different lengths"),
        "4-d array": (str(tmp / "three_d_one.npy"), r"three_d_one.npy: a single predictions"),
    }


CASES = [
    "missing",
    "directory",
    "truncated npy",
    "corrupt header",
    "binary csv",
    "header-only csv",
    "ragged csv",
    "4-d array",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_files(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preds, targets = make_problem(tmp_path)
    path, expected = bad_inputs(tmp_path, preds)[case]
    out = tmp_path / "w.json"
    code, _, err = run(
        ["--predictions", path, "--targets", str(targets), "--out", str(out)], capsys
    )
    assert code == 2
    one_error_line(err, expected)
    assert not out.exists()


def test_bom_csv_keeps_its_first_row(tmp_path: Path) -> None:
    """Excel's UTF-8 BOM made the first data row look like a header."""
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf0.25,0.75\r\n0.5,0.5\r\n")
    (tmp_path / "bom_header.csv").write_bytes(b"\xef\xbb\xbfa,b\r\n0.25,0.75\r\n")
    np.testing.assert_array_equal(
        _io.read_arrays(tmp_path / "bom.csv")[0][1], [[0.25, 0.75], [0.5, 0.5]]
    )
    np.testing.assert_array_equal(
        _io.read_arrays(tmp_path / "bom_header.csv")[0][1], [[0.25, 0.75]]
    )


def test_unwritable_out_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preds, targets = make_problem(tmp_path)
    (tmp_path / "afile").write_text("x")
    base = ["--predictions", str(preds), "--targets", str(targets)]
    bad = tmp_path / "afile" / "w.json"  # a parent that is a file: works even as root
    code, _, err = run([*base, "--out", str(bad)], capsys)
    assert code == 2
    one_error_line(err, re.escape(f"cannot write {bad}"))
    (tmp_path / "adir.json").mkdir()
    code, _, err = run([*base, "--out", str(tmp_path / "adir.json")], capsys)
    assert code == 2
    one_error_line(err, "cannot write .*adir.json")
    assert list(tmp_path.glob(".*")) == []  # no temporary file left behind


def test_failed_write_keeps_the_previous_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error mid-write (a file-size limit) leaves the previous file, not a truncated
    one."""
    preds, targets = make_problem(tmp_path)
    out = tmp_path / "w.json"
    base = ["--predictions", str(preds), "--targets", str(targets), "--out", str(out)]
    assert run(base, capsys)[0] == 0
    good = out.read_text()
    assert json.loads(good)["weights"]

    real = Path.write_text

    def half_then_efbig(self: Path, data: str, *a: object, **kw: object) -> int:
        real(self, data[: len(data) // 2])
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(Path, "write_text", half_then_efbig)
    code, _, err = run(base, capsys)
    monkeypatch.undo()
    assert code == 2
    one_error_line(err, re.escape(f"cannot write {out}: File too large"))
    assert out.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy", "w.json", "y.npy"]


def test_bad_plot_name_fails_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plot w.xyz fails before --out is written."""
    preds, targets = make_problem(tmp_path)
    out = tmp_path / "w.json"
    code, stdout, err = run(
        [
            *["--predictions", str(preds), "--targets", str(targets)],
            *["--out", str(out), "--plot", str(tmp_path / "w.xyz")],
        ],
        capsys,
    )
    assert code == 2
    one_error_line(err, r"w.xyz: cannot draw a '.xyz' file; use one of .png")
    assert stdout == ""
    assert not out.exists()


def test_plot_without_suffix_reports_the_png_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--plot noext writes and reports noext.png."""
    pytest.importorskip("matplotlib")
    preds, targets = make_problem(tmp_path)
    code, stdout, err = run(
        ["--predictions", str(preds), "--targets", str(targets), "--plot", str(tmp_path / "noext")],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "noext.png").is_file()
    assert not (tmp_path / "noext").exists()
    assert f"wrote {tmp_path / 'noext.png'}" in stdout.replace("\n", "")


def test_closed_output_pipe_still_writes_the_file_and_exits_quietly(tmp_path: Path) -> None:
    """`convexmix ensemble ... --out w.json | head -3`: the reader goes away before the
    tables are printed; the result file is written first, and the command ends quietly
    (no message, exit code 0) as Unix tools do."""
    preds, targets = make_problem(tmp_path)
    out, ref = tmp_path / "w.json", tmp_path / "ref.json"
    args = [sys.executable, "-m", "convexmix", "ensemble", "--predictions", str(preds)]
    args += ["--targets", str(targets), "--size", "5", "--out"]
    proc = subprocess.Popen([*args, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the reader goes away before the first table is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert err == ""
    done = subprocess.run([*args, str(ref)], capture_output=True, check=True)
    assert b"Blend weights" in done.stdout
    assert json.loads(out.read_text()) == json.loads(ref.read_text())


def test_head_on_a_shell_pipe(tmp_path: Path) -> None:
    """The same through a shell: `| head -3` prints 3 lines and the file is complete."""
    preds, targets = make_problem(tmp_path)
    out = tmp_path / "w.json"
    cmd = (
        f"set -o pipefail; '{sys.executable}' -m convexmix ensemble --predictions '{preds}' "
        f"--targets '{targets}' --size 5 --bootstrap 2 --out '{out}' | head -3"
    )
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 3
    assert len(json.loads(out.read_text())["bootstrap"]["draws"]) == 2
