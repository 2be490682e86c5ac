"""merge_checkpoints streams: its anonymous memory stays far below the inputs' size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, re, sys, threading, time
from pathlib import Path
import torch
import convexmix as cx
from safetensors.torch import load_file, save_file

def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

root = Path(sys.argv[1])
n, shards = int(sys.argv[2]), 4
paths = []
for k in range(3):
    folder = root / f"m{k}"
    folder.mkdir()
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        g = torch.Generator().manual_seed(10 * k + s)
        save_file({f"layers.{s}.w": torch.randn(n, generator=g).bfloat16()}, str(folder / name))
        weight_map[f"layers.{s}.w"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    paths.append(folder)
inputs = sum(p.stat().st_size for f in paths for p in f.iterdir())
config = {
    "merge_method": "task_arithmetic",
    "base_model": str(paths[0]),
    "models": [{"model": str(p), "parameters": {"weight": [0.3, 0.6]}} for p in paths[1:]],
    "dtype": "bfloat16",
}
# warm-up: torch's and convexmix's one-off set-up, on a tiny merge
tiny = root / "tiny.safetensors"
save_file({"w": torch.randn(10)}, str(tiny))
warm = {"merge_method": "linear", "models": [{"model": str(tiny), "parameters": {"weight": 1.0}}]}
cx.merge.merge_checkpoints(warm, root / "warm")

def peak_of(run):
    start = anon()
    peak = [start]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = run()
    peak[0] = max(peak[0], anon())
    stop.set()
    thread.join()
    del result
    return peak[0] - start

merge = peak_of(lambda: cx.merge.merge_checkpoints(config, root / "out"))
files = [f for p in paths for f in p.glob("*.safetensors")]
control = peak_of(lambda: [{k: v.clone() for k, v in load_file(str(f)).items()} for f in files])
print(json.dumps({"merge": merge, "control": control, "inputs": inputs}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_anonymous_memory_is_a_few_chunks(tmp_path: Path) -> None:
    """3 checkpoints of 4 bf16 shards (3 x 64 MiB): the merge's anonymous memory peaks
    below a quarter of the inputs (loading them instead costs all of it: the control)."""
    pytest.importorskip("safetensors")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(1 << 23)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["merge"] < got["inputs"] / 4, got
    assert got["control"] > 0.9 * got["inputs"], got  # the measure sees copies
