"""The same configuration gives the same tensors as mergekit (where it is installed: it
is never a dependency; the test skips without it). Tiny Llama-shaped checkpoints, so
that mergekit knows the architecture."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import convexmix as cx
from convexmix.merge import LearnedMerge
from convexmix.merge._files import save_state_dict

from .checkpoints import read_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit is not installed"
)
H, FF, LAYERS, VOCAB = 16, 24, 4, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict(
            {f"{n}_proj": nn.Linear(H, H, bias=False) for n in ("q", "k", "v", "o")}
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(H, FF, bias=False),
                "up_proj": nn.Linear(H, FF, bias=False),
                "down_proj": nn.Linear(FF, H, bias=False),
            }
        )
        self.input_layernorm = nn.RMSNorm(H)
        self.post_attention_layernorm = nn.RMSNorm(H)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, H)
        self.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.norm = nn.RMSNorm(H)


class TinyLlama(nn.Module):
    """The parameter names of transformers' LlamaForCausalLM (no forward needed here)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(H, VOCAB, bias=False)


def llama(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = TinyLlama()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    folder.mkdir(parents=True)
    save_state_dict(net.state_dict(), folder, 6000)  # several shards
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_mergekit(config: dict[str, object], out: Path) -> dict[str, Tensor]:
    yaml = pytest.importorskip("yaml")
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "from mergekit.scripts.run_yaml import main; main()"
    args = [str(path), str(out), "--no-copy-tokenizer", "--no-write-model-card"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_model(out)


def assert_same(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name, a in ours.items():
        b = theirs[name]
        assert a.dtype == b.dtype, name
        scale = float(b.double().abs().max()) + 1
        ulp = 2**-7 if a.dtype == torch.bfloat16 else 8 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(a.double(), b.double(), rtol=ulp, atol=ulp * scale)


CONFIGS = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "m0", "parameters": {"weight": [0.2, 1.0, 0.4]}},
            {
                "model": "m1",
                "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]},
            },
            {"model": "m2", "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "m0",
        "models": [
            {"model": "m0"},
            {"model": "m1", "parameters": {"weight": [0.3, 0.9]}},
            {
                "model": "m2",
                "parameters": {"weight": [{"filter": "self_attn", "value": -0.4}, {"value": 0.6}]},
            },
        ],
        "parameters": {"lambda": 0.8, "normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors_as_mergekit(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the configuration's paths are relative, as mergekit's
    for k in range(3):
        llama(tmp_path / f"m{k}", k)
    config = CONFIGS[name]
    ours = read_model(cx.merge.merge_checkpoints(config, tmp_path / "ours"))
    assert_same(ours, run_mergekit(config, tmp_path / "theirs"))


def test_mergekit_applies_what_learned_merge_exports(tmp_path: Path) -> None:
    paths = [llama(tmp_path / f"m{k}", k) for k in range(3)]
    base = llama(tmp_path / "base", 7)
    merged_files = []
    for p in [*paths, base]:  # one file each, for from_safetensors
        one = p.parent / f"{p.name}.safetensors"
        pytest.importorskip("safetensors.torch").save_file(read_model(p), str(one))
        merged_files.append(one)
    merge = LearnedMerge.from_safetensors(
        merged_files[:3],
        TinyLlama(),
        base=merged_files[3],
        granularity="per_module",
        scale="learn_per_group",
    )
    with torch.no_grad():
        merge.free.normal_()
        assert merge.log_scale is not None
        merge.log_scale.normal_(0, 0.3)
    config = merge.to_config(paths, base)
    theirs = run_mergekit(config, tmp_path / "theirs")
    expected = merge.merged_state_dict()
    assert_same({n: theirs[n] for n in expected}, {n: t.detach() for n, t in expected.items()})
