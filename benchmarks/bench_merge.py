"""LearnedMerge against the per-step-copy learned soup: peak memory and step time.

    python benchmarks/bench_merge.py [--models 8] [--width 2048] [--depth 4] [--steps 5]

K MLPs of ``depth`` layers of ``width`` x ``width`` (float32) are the ingredients. One
training step of the merging weights (batch 64, cross-entropy) runs with:

* ``convexmix global`` / ``convexmix per_tensor``: :class:`cx.merge.LearnedMerge`;
* ``convexmix task arithmetic``: the same with ``base=`` (a (K+1)-th model) and
  ``scale="learn"``, per module (AdaMerging's layer-wise merge);
* ``per-step copy``: the learned soup as model-soups and AdaMerging write it, re-created
  in a few lines: the ingredients are the models' own parameters (with
  ``requires_grad``), and every step stacks them, multiplies by the weights, sums, and
  runs a deep copy of the template on the result; the backward fills a ``.grad`` for
  every ingredient.

Each method runs in a fresh process, and its peak memory is the growth of the process's
maximum resident set size over the state right after the ingredients are built (Linux
``ru_maxrss``, with glibc's mmap threshold fixed at 128 KiB so that freed tensors leave
the resident set at once), after one step on tiny models that pays torch's one-off
set-up. The step time is the median of ``--steps`` steps after one
warm-up, in a second process with the default allocator settings.

A second table puts the K ingredients (and the base) on disk as ``.safetensors`` files:
``from_safetensors`` memory-maps them. A sampling thread reads the process's anonymous
(``RssAnon``) and file-backed (``RssFile``: the mapped ingredients, page cache the kernel
can drop) resident memory every 0.5 ms during the steps; their peaks above the state
before the merge is built are printed, with the step time against the same merge built
from the in-memory models.

``--checkpoints SIZE_MB`` measures :func:`cx.merge.merge_checkpoints` instead: three
synthetic Llama-shaped bf16 checkpoints of about ``SIZE_MB`` each, in 4 shards, merged by a
``task_arithmetic`` configuration (one of them the base) into bf16 shards. Each timing
runs in a fresh process after its imports: reading every input file once with
``readinto`` into a 1 MiB buffer (the baseline: the fastest plain read, as ``cat`` or
``dd bs=1M`` do) and into a 64 MiB buffer (slower: the buffer does not stay in the
cache), the merge, the merge as the git revision ``--before-ref REV`` has it (to compare
a change in the same run), and, where mergekit is installed (unless ``--no-mergekit``),
mergekit's ``run_merge`` on the same configuration; interleaved rounds, best of each,
with the page cache warm (the files read just before) and cold (the inputs' pages dropped
with ``posix_fadvise``). Time is wall-clock; CPU time is user + system over all the
process's threads (the merge writes from a second thread). The peak anonymous memory
(``RssAnon``, sampled every 2 ms) is above the state after the imports. The load
average before and after is printed with the table: on a busy machine the warm ratios
measure the load as much as the merge.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

import convexmix as cx


def make_models(k: int, width: int, depth: int) -> list[nn.Module]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, 10))
        models.append(nn.Sequential(*layers))
    return models


class CopySoup(nn.Module):
    """The per-step-copy learned soup (model-soups' learned soup, AdaMerging)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.alpha = nn.Parameter(torch.zeros(len(models)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.alpha, 0)
        merged = copy.deepcopy(self.models[0])
        params = {}
        for name, p in merged.named_parameters():
            stacked = torch.stack([dict(m.named_parameters())[name] for m in self.models])
            params[name] = (w.view(-1, *[1] * p.dim()) * stacked).sum(0)
        out: torch.Tensor = torch.func.functional_call(merged, params, (x,))
        return out


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_now() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process, MB."""
    with open("/proc/self/status") as f:
        status = f.read()
    kb = [int(re.search(k + r":\s+(\d+)", status).group(1)) for k in ("RssAnon", "RssFile")]  # type: ignore[union-attr]
    return kb[0] / 1024, kb[1] / 1024


class PeakSampler:
    """Peak RssAnon and RssFile, sampled every ``interval`` seconds by a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.start = rss_now()
        self.peak = list(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        now = rss_now()
        self.peak = [max(p, n) for p, n in zip(self.peak, now, strict=True)]

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak[0] - self.start[0], self.peak[1] - self.start[1]


def build(method: str, models: list[nn.Module]) -> tuple[nn.Module, list[torch.Tensor]]:
    if method == "per-step copy":
        soup = CopySoup(models)
        return soup, [soup.alpha]
    if method == "convexmix task arithmetic":  # models[-1] is the base
        merge = cx.merge.LearnedMerge(
            models[:-1], base=models[-1], scale="learn", granularity="per_module"
        )
        return merge, list(merge.parameters())
    granularity = method.split()[-1]
    merge = cx.merge.LearnedMerge(models, granularity=granularity)  # type: ignore[arg-type]
    return merge, list(merge.parameters())


def child_disk(
    method: str, k: int, width: int, depth: int, steps: int, folder: str
) -> dict[str, float]:
    """``method``: "disk soup", "disk task arithmetic", "memory soup", "memory task
    arithmetic" (the same merge from models loaded into memory from the same files)."""
    tiny, _ = build("convexmix task arithmetic", make_models(3, 16, 1))
    nn.functional.cross_entropy(tiny(torch.randn(4, 16)), torch.randint(0, 10, (4,))).backward()
    template = make_models(1, width, depth)[0]
    x, y = torch.randn(64, width), torch.randint(0, 10, (64,))
    paths = [os.path.join(folder, f"m{i}.safetensors") for i in range(k)]
    base = os.path.join(folder, "base.safetensors")
    arithmetic = method.endswith("task arithmetic")
    kw: dict[str, object] = {"granularity": "per_module"}
    if arithmetic:
        kw["scale"] = "learn"
    sampler = PeakSampler()
    if method.startswith("disk"):
        if arithmetic:
            kw["base"] = base
        merge = cx.merge.LearnedMerge.from_safetensors(paths, template, **kw)  # type: ignore[arg-type]
    else:
        from safetensors.torch import load_file

        def load(path: str) -> dict[str, torch.Tensor]:
            return {n: t.clone() for n, t in load_file(path).items()}  # in memory

        if arithmetic:
            kw["base"] = load(base)
        merge = cx.merge.LearnedMerge([load(p) for p in paths], template=template, **kw)  # type: ignore[arg-type]
    opt = torch.optim.SGD(merge.parameters(), lr=0.1)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(merge(x), y).backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    anon, file = sampler.stop()
    return {"anon_mb": anon, "file_mb": file, "step_s": statistics.median(times)}


def child(method: str, k: int, width: int, depth: int, steps: int) -> dict[str, float]:
    # One step on tiny models first: torch's one-off set-up (thread pools, kernels, about
    # 70 MB here) is not part of any method's footprint.
    tiny, _ = build(method, make_models(2, 16, 1))
    nn.functional.cross_entropy(tiny(torch.randn(4, 16)), torch.randint(0, 10, (4,))).backward()
    torch.manual_seed(0)
    models = make_models(k + (method == "convexmix task arithmetic"), width, depth)
    x, y = torch.randn(64, width), torch.randint(0, 10, (64,))
    base = max_rss_mb()
    module, params = build(method, models)
    opt = torch.optim.SGD(params, lr=0.1)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
    ingredients = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return {
        "peak_mb": max_rss_mb() - base,
        "step_s": statistics.median(times),
        "ingredients_mb": ingredients / 2**20,
    }


H_LAYERS, VOCAB = 8, 32000


def llama_shapes(size_mb: float) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-like model of about ``size_mb`` MB in bf16."""
    hidden = 64
    while True:
        ff = hidden * 11 // 4
        params = H_LAYERS * (4 * hidden**2 + 3 * hidden * ff + 2 * hidden) + 2 * VOCAB * hidden
        if 2 * params >= size_mb * 1e6:
            break
        hidden += 64
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(H_LAYERS):
        p = f"model.layers.{i}."
        for n in "qkvo":
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (ff, hidden)
        shapes[p + "mlp.up_proj.weight"] = (ff, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, ff)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (VOCAB, hidden)
    return shapes


def write_llama(folder: str, seed: int, shapes: dict[str, tuple[int, ...]], shards: int) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder)
    names = list(shapes)
    total = sum(math.prod(s) for s in shapes.values())
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        if groups[-1] and size >= total / shards and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += math.prod(shapes[n])
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {n: torch.randn(shapes[n], generator=gen).bfloat16() for n in group}
        save_file(state, os.path.join(folder, fname))
        weight_map.update(dict.fromkeys(group, fname))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    hidden = shapes["model.norm.weight"][0]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0],
        "num_hidden_layers": H_LAYERS,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def input_files(root: str) -> list[str]:
    return sorted(
        os.path.join(root, m, f)
        for m in ("m0", "m1", "m2")
        for f in os.listdir(os.path.join(root, m))
        if f.endswith(".safetensors")
    )


def drop_cache(paths: list[str]) -> None:
    """Evict these files' pages from the page cache (only theirs)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


READ_BUFFERS = {"read": 1 << 20, "read 64 MiB": 64 << 20}
#: Reading every input once and writing one model's bytes to new files (1 MiB blocks).
COPY = "read + write"


def child_checkpoints(mode: str, root: str) -> dict[str, float]:
    """One timing of ``mode`` (a key of ``READ_BUFFERS``, ``convexmix`` (also the one of
    ``--before-ref``: another ``PYTHONPATH``) or ``mergekit``) in this fresh process."""
    config = {
        "merge_method": "task_arithmetic",
        "base_model": os.path.join(root, "m0"),
        "models": [
            {"model": os.path.join(root, m), "parameters": {"weight": 0.5}} for m in ("m1", "m2")
        ],
        "parameters": {"lambda": 0.8},
        "dtype": "bfloat16",
    }
    out = os.path.join(root, "out-" + mode.replace(" ", "-"))
    if mode == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        options = MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=True)
        parsed = MergeConfiguration.model_validate(config)

        def run() -> None:
            run_merge(parsed, out, options=options)

    elif mode == "convexmix":

        def run() -> None:
            cx.merge.merge_checkpoints(config, out, force=True, progress=False)

    elif mode == COPY:
        buffer = bytearray(READ_BUFFERS["read"])

        def run() -> None:
            # The floor of any merge: every input read once, and an output the size of
            # one model written to new files (a copy of the first model's shards).
            os.mkdir(out)
            for path in input_files(root):
                copy = os.sep + "m0" + os.sep in path
                target = os.path.join(out, os.path.basename(path)) if copy else os.devnull
                with open(path, "rb", buffering=0) as f, open(target, "wb", buffering=0) as g:
                    while n := f.readinto(buffer):
                        if copy:
                            g.write(memoryview(buffer)[:n])

    else:
        buffer = bytearray(READ_BUFFERS[mode])

        def run() -> None:
            for path in input_files(root):
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buffer):
                        pass

    sampler = PeakSampler(0.002)  # (its CPU time, about 1%, is in every mode's)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    anon, _ = sampler.stop()
    shutil.rmtree(out, ignore_errors=True)
    used = end.ru_utime - cpu.ru_utime + end.ru_stime - cpu.ru_stime
    return {"s": seconds, "cpu_s": used, "anon_mb": anon}


def source_at(rev: str, folder: str) -> str:
    """The ``src`` folder of the git revision ``rev`` of this repository, extracted into
    ``folder``, with this checkout's built native kernels (git does not hold them)."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    kernels = Path(cx.__file__).parent / "_kernels"
    for lib in kernels.glob("*.so"):
        target = Path(folder) / "src" / "convexmix" / "_kernels" / lib.name
        if not target.exists():
            shutil.copy2(lib, target)
    return str(Path(folder) / "src")


def checkpoint_table(
    size_mb: float, rounds: int, before: str | None = None, mergekit: bool = True
) -> None:
    import importlib.util

    modes = [*READ_BUFFERS, COPY, "convexmix"]
    if before is not None:
        modes.append(f"convexmix {before}")
    if mergekit and importlib.util.find_spec("mergekit") is not None:
        modes.append("mergekit")
    shapes = llama_shapes(size_mb)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
        env = dict(os.environ)
        if before is not None:
            os.mkdir(os.path.join(root, "before"))
            old_src = source_at(before, os.path.join(root, "before"))
        for k in range(3):
            write_llama(os.path.join(root, f"m{k}"), k, shapes, shards=4)
        files = input_files(root)
        total = sum(os.path.getsize(p) for p in files) / 2**20
        best: dict[tuple[str, str], dict[str, float]] = {}
        for _ in range(rounds):
            for cache in ("warm", "cold"):
                for mode in modes:
                    if cache == "cold":
                        drop_cache(files)
                    else:  # warm: every input page is in memory
                        child_checkpoints("read", root)
                    child, env_mode = mode, env
                    if mode.startswith("convexmix "):  # the same merge, older code
                        child = "convexmix"
                        path = os.pathsep.join(p for p in (old_src, env.get("PYTHONPATH")) if p)
                        env_mode = {**env, "PYTHONPATH": path}
                    cmd = [sys.executable, __file__, "--child", child, "--folder", root]
                    cmd += ["--checkpoints", str(size_mb)]
                    res = subprocess.run(
                        cmd, capture_output=True, text=True, check=True, env=env_mode
                    )
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    key = (cache, mode)
                    if key not in best or r["s"] < best[key]["s"]:
                        best[key] = r
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"\n3 checkpoints of {total / 3:.0f} MiB (bf16, 4 shards each; inputs {total:.0f} MiB), "
        f"task_arithmetic to bf16; best of {rounds} interleaved rounds; {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average "
        f"{' '.join(load_before)} before, {' '.join(load)} after\n"
    )
    print(
        "| page cache | run | time | vs reading the inputs once | vs read + write | CPU time "
        "| vs the read's CPU time | peak anonymous memory |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (cache, mode), r in best.items():
        ref, floor = best[(cache, "read")], best[(cache, COPY)]
        print(
            f"| {cache} | {mode} | {r['s']:.2f} s | {r['s'] / ref['s']:.2f}x | "
            f"{r['s'] / floor['s']:.2f}x | {r['cpu_s']:.2f} s | "
            f"{r['cpu_s'] / ref['cpu_s']:.2f}x | {r['anon_mb']:.0f} MB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-disk", action="store_true", help="skip the on-disk table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument(
        "--checkpoints", type=float, metavar="SIZE_MB", help="merge_checkpoints instead"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --checkpoints")
    parser.add_argument(
        "--before-ref",
        metavar="REV",
        help="with --checkpoints: also time the merge of this git revision (e.g. main)",
    )
    parser.add_argument(
        "--no-mergekit", action="store_true", help="with --checkpoints: skip mergekit"
    )
    args = parser.parse_args()
    if args.checkpoints and args.child:
        print(json.dumps(child_checkpoints(args.child, args.folder)))
        return
    if args.checkpoints:
        checkpoint_table(args.checkpoints, args.rounds, args.before_ref, not args.no_mergekit)
        return
    sizes = (args.models, args.width, args.depth, args.steps)
    if args.child and args.folder:
        print(json.dumps(child_disk(args.child, *sizes, args.folder)))
        return
    if args.child:
        print(json.dumps(child(args.child, *sizes)))
        return
    methods = ["convexmix global", "convexmix per_tensor", "convexmix task arithmetic"]
    methods.append("per-step copy")
    results = {}
    for method in methods:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--models",
            str(args.models),
            "--width",
            str(args.width),
            "--depth",
            str(args.depth),
            "--steps",
            str(args.steps),
        ]
        # Memory: a fixed mmap threshold makes glibc return every large block when it is
        # freed, so the peak resident size follows the live tensors, not heap
        # fragmentation. Time: a normal process (that setting costs page faults).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        mem = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        run = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(mem.strip().splitlines()[-1])
        results[method]["step_s"] = json.loads(run.strip().splitlines()[-1])["step_s"]
    one = results[methods[0]]["ingredients_mb"] / args.models
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; K={args.models} MLPs of "
        f"{args.depth}x{args.width}^2 (one model {one:.0f} MB, all ingredients "
        f"{results[methods[0]]['ingredients_mb']:.0f} MB), batch 64\n"
    )
    ref = results["per-step copy"]
    print("| method | peak extra memory | in model copies | step time | vs per-step copy |")
    print("|---|---|---|---|---|")
    for method, r in results.items():
        print(
            f"| {method} | {r['peak_mb']:.0f} MB | {r['peak_mb'] / one:.1f} | "
            f"{r['step_s'] * 1e3:.0f} ms | memory {r['peak_mb'] / ref['peak_mb']:.2f}x, "
            f"time {r['step_s'] / ref['step_s']:.2f}x |"
        )
    if not args.no_disk:
        disk_table(args, one)


def disk_table(args: argparse.Namespace, one: float) -> None:
    """K ingredients and a base as .safetensors files: from_safetensors vs in memory."""
    from safetensors.torch import save_file

    k = args.models
    with tempfile.TemporaryDirectory() as folder:
        for i, model in enumerate(make_models(k + 1, args.width, args.depth)):
            name = "base" if i == k else f"m{i}"
            save_file(model.state_dict(), os.path.join(folder, f"{name}.safetensors"))
        results = {}
        for method in (
            "disk soup",
            "memory soup",
            "disk task arithmetic",
            "memory task arithmetic",
        ):
            cmd = [sys.executable, __file__, "--child", method, "--folder", folder]
            cmd += ["--models", str(k), "--width", str(args.width), "--depth", str(args.depth)]
            cmd += ["--steps", str(args.steps)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            mem = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            run = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[method] = json.loads(mem.strip().splitlines()[-1])
            results[method]["step_s"] = json.loads(run.strip().splitlines()[-1])["step_s"]
    print(
        f"\nK={k} ingredients (+ a base for task arithmetic) as .safetensors files, per_module "
        f"weights; peaks above the state before the merge is built (one model {one:.0f} MB)\n"
    )
    print(
        "| merge | ingredients | peak anonymous | in model copies | peak file-backed | "
        "step time | vs in memory |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        where, what = method.split(" ", 1)
        ref = results[f"memory {what}"]
        print(
            f"| {what} | {'memory-mapped' if where == 'disk' else 'loaded'} | "
            f"{r['anon_mb']:.0f} MB | {r['anon_mb'] / one:.1f} | {r['file_mb']:.0f} MB | "
            f"{r['step_s'] * 1e3:.0f} ms | {r['step_s'] / ref['step_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
