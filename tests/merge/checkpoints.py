"""Synthetic safetensors checkpoints for the merge tests: Hugging Face layouts, mixed
dtypes, layer stacks, odd shard boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

st = __import__("pytest").importorskip("safetensors.torch")


def make_state(seed: int, layers: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A small decoder-like state: embeddings (bf16), a layer stack, a norm (float16), an
    integer buffer, and odd sizes so that shards split at uneven places."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(37, 8, generator=g).bfloat16()}
    for i in range(layers):
        state[f"model.layers.{i}.attn.weight"] = torch.randn(8, 8, generator=g).to(dtype)
        state[f"model.layers.{i}.mlp.weight"] = torch.randn(13, 8, generator=g).to(dtype)
        state[f"model.layers.{i}.norm.weight"] = torch.randn(8, generator=g).to(dtype)
    state["model.norm.weight"] = torch.randn(8, generator=g).half()
    state["lm_head.weight"] = torch.randn(37, 8, generator=g).to(dtype)
    state["model.position_ids"] = torch.arange(5) + seed
    state["scalar"] = torch.randn((), generator=g).to(dtype)
    return state


def write_model(folder: Path, state: dict[str, Tensor], layout: str, shard: int = 700) -> Path:
    """Save ``state`` as "file" (one .safetensors), "single" (folder/model.safetensors) or
    "sharded" (several files of about ``shard`` bytes with an index), with a config.json
    and a tokenizer file; return the path a configuration names."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "file":
        path = folder / "weights.safetensors"
        st.save_file(state, str(path))
        return path
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "x"}))
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    if layout == "single":
        st.save_file(state, str(folder / "model.safetensors"))
        return folder
    names = list(state)
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = state[n].numel() * state[n].element_size()
        if groups[-1] and size + nbytes > shard:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        st.save_file({n: state[n] for n in group}, str(folder / fname))
        weight_map.update(dict.fromkeys(group, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def read_model(path: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint in any of the layouts."""
    if path.is_file():
        return dict(st.load_file(str(path)))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
        out: dict[str, Tensor] = {}
        for f in sorted(files):
            out.update(st.load_file(str(path / f)))
        return out
    return dict(st.load_file(str(path / "model.safetensors")))
