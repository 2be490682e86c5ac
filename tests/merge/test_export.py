"""LearnedMerge -> to_config -> merge_checkpoints equals merged_state_dict; save_merged;
the regressions of model 0's buffers and tied weights; the Simplex route."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import convexmix as cx
from convexmix.merge import LearnedMerge
from convexmix.merge._files import save_state_dict

from .checkpoints import read_model

st = pytest.importorskip("safetensors.torch")


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    with torch.no_grad():  # distinct statistics per model
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(seed)
    return net


def save(nets: list[nn.Module], folder: Path) -> list[Path]:
    paths = []
    for k, net in enumerate(nets):
        path = folder / f"m{k}.safetensors"
        st.save_file({n: t.contiguous() for n, t in net.state_dict().items()}, str(path))
        paths.append(path)
    return paths


def train(merge: LearnedMerge, steps: int = 3) -> None:
    opt = torch.optim.Adam(merge.parameters(), lr=0.3)
    merge.eval()  # the statistics stay the ingredients'
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(merge(x), y).backward()
        opt.step()


@pytest.mark.parametrize("granularity", ["global", "per_module", "per_tensor"])
@pytest.mark.parametrize(
    ("scale", "buffers"),
    [(1.0, "first"), (1.0, "mean"), (0.6, "first"), ("learn_per_group", "mean")],
)
def test_round_trip_equals_merged_state_dict(
    tmp_path: Path, granularity: str, scale: float | str, buffers: str
) -> None:
    nets = [make_net(k) for k in range(3)]
    paths = save(nets, tmp_path)
    base = None
    if scale != 1.0:
        base = tmp_path / "base.safetensors"
        st.save_file(make_net(9).state_dict(), str(base))
    merge = LearnedMerge.from_safetensors(
        paths,
        make_net(5),
        base=base,
        granularity=granularity,
        scale=scale,
        buffers=buffers,  # type: ignore[arg-type]
    )
    train(merge)
    config = merge.to_config()
    assert config["merge_method"] == ("linear" if scale == 1.0 else "task_arithmetic")
    yaml = pytest.importorskip("yaml")
    cfg_path = merge.save_config(tmp_path / "learned.yml")
    assert yaml.safe_load(cfg_path.read_text()) == config
    out = cx.merge.merge_checkpoints(cfg_path, tmp_path / "out")
    merged, expected = read_model(out), merge.merged_state_dict()
    assert merged.keys() == expected.keys()
    for name, want in expected.items():
        got = merged[name]
        assert got.dtype == want.dtype
        if want.is_floating_point():
            scale_ = 1 + 2 * abs(float(merge.scale.detach().max()))
            torch.testing.assert_close(
                got, want, rtol=0, atol=4e-7 * scale_ * float(want.abs().max() + 1)
            )
        else:
            assert torch.equal(got, want)
    # the model that the merged checkpoint loads gives the merge's outputs
    model = make_net(7).eval()
    model.load_state_dict(merged)
    x = torch.randn(6, 4)
    torch.testing.assert_close(model(x), merge(x), rtol=1e-5, atol=1e-5)


def test_per_module_rules_are_one_per_module(tmp_path: Path) -> None:
    nets = [make_net(k) for k in range(2)]
    merge = LearnedMerge(
        nets, granularity="per_module", init=[[0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]
    )
    config = merge.to_config(["a", "b"])
    rules = config["models"][0]["parameters"]["weight"]  # type: ignore[index]
    filters = [r["filter"] for r in rules]
    # one rule per module and per buffer, longest first
    assert filters == sorted(filters, key=len, reverse=True)
    assert {"0.", "1.", "3.", "5."} <= set(filters)
    assert len(filters) == 4 + 3


def test_save_merged(tmp_path: Path) -> None:
    nets = [make_net(k) for k in range(3)]
    merge = LearnedMerge(nets, granularity="per_tensor")
    with torch.no_grad():
        merge.free.normal_()
    out = merge.save_merged(tmp_path / "merged", shard_size=200)
    saved, expected = read_model(out), merge.merged_state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[n], expected[n]) for n in saved)
    assert (out / "model.safetensors.index.json").exists()
    with pytest.raises(cx.ConvexMixError, match="not empty"):
        merge.save_merged(tmp_path / "merged")


def test_to_config_errors_and_trained_buffers_warning(tmp_path: Path) -> None:
    nets = [make_net(k) for k in range(2)]
    merge = LearnedMerge(nets)
    with pytest.raises(cx.ConvexMixError, match="pass models="):
        merge.to_config()
    with pytest.raises(cx.ConvexMixError, match="checkpoints of the ingredients"):
        merge.to_config(["only-one"])
    ta = LearnedMerge(nets, base=make_net(4), scale=0.5)
    with pytest.raises(cx.ConvexMixError, match="pass base="):
        ta.to_config(["a", "b"])
    merge.train()
    merge(torch.randn(8, 4))  # BatchNorm updates the merge's statistics
    with pytest.warns(
        cx.ConvexMixWarning,
        match=r"buffers \['1\.running_mean', '1\.running_var', '1\.num_batches_tracked'\] changed",
    ):
        merge.to_config(["a", "b"])


# ---------------------------------------------------------------- model 0's buffers


def test_buffers_first_are_model_0s_not_the_templates(tmp_path: Path) -> None:
    """buffers="first" (the default) means model 0's BatchNorm statistics, whether the
    ingredients are modules, state_dicts or files, whatever the template holds."""
    nets = [make_net(k) for k in range(3)]
    template = make_net(8)
    want = nets[0].state_dict()
    built = {
        "state_dicts": LearnedMerge([n.state_dict() for n in nets], template=template),
        "modules with a template": LearnedMerge(nets, template=template),
        "files": LearnedMerge.from_safetensors(save(nets, tmp_path), template),
    }
    for label, merge in built.items():
        for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            got = merge.merged_state_dict()[name]
            assert torch.equal(got, want[name]), (label, name)
    mean = LearnedMerge([n.state_dict() for n in nets], template=template, buffers="mean")
    ref = torch.stack([n[1].running_mean for n in nets]).mean(0)  # type: ignore[index]
    torch.testing.assert_close(mean.merged_state_dict()["1.running_mean"], ref)
    assert torch.equal(
        mean.merged_state_dict()["1.num_batches_tracked"], want["1.num_batches_tracked"]
    )


# ---------------------------------------------------------------- tied weights


class Tied(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.tanh(self.mid(self.emb(x))))
        return out


def test_tied_weights(tmp_path: Path) -> None:
    models = [Tied(k) for k in range(3)]
    x = torch.randint(0, 10, (5,))
    for ingredients in (models, [m.state_dict() for m in models]):
        merge = LearnedMerge(
            ingredients, template=Tied(9), granularity="per_module", init=[0.2, 0.3, 0.5]
        )
        state = merge.merged_state_dict()
        assert list(state) == list(Tied(0).state_dict())
        manual = sum(
            w * m.emb.weight for w, m in zip([0.2, 0.3, 0.5], models, strict=True)
        ).detach()
        torch.testing.assert_close(state["out.weight"], manual)
        assert state["out.weight"] is state["emb.weight"]
        plain = merge.merged_model()
        assert plain.out.weight is plain.emb.weight  # type: ignore[union-attr]
        torch.testing.assert_close(plain(x), merge(x))
    # files with both names (save_merged's layout) or one (safetensors' save_model)
    folder = tmp_path / "both"
    folder.mkdir()
    save_state_dict(models[0].state_dict(), folder, 10**9)
    one = tmp_path / "one.safetensors"
    st.save_model(models[1], str(one))
    merge = LearnedMerge.from_safetensors([folder / "model.safetensors", one], Tied(9))
    manual = (0.5 * models[0].emb.weight + 0.5 * models[1].emb.weight).detach()
    torch.testing.assert_close(merge.merged_state_dict()["out.weight"], manual)
    config = merge.to_config()
    assert config["models"][0]["parameters"]["weight"] == 0.5  # type: ignore[index]


# ---------------------------------------------------------------- one route


def test_weights_come_through_simplex(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = cx.Simplex.forward

    def spy(self: cx.Simplex, free: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(self.map)
        return original(self, free, mask)

    monkeypatch.setattr(cx.Simplex, "forward", spy)
    merge = LearnedMerge([make_net(k) for k in range(2)], map="sparsemax", init=[0.9, 0.1])
    torch.testing.assert_close(merge.weights, torch.tensor([0.9, 0.1]))
    assert calls == ["sparsemax"]
    merge.eval()(torch.randn(3, 4))
    assert calls == ["sparsemax", "sparsemax"]
    source = "".join(p.read_text() for p in Path(cx.merge.__file__).parent.glob("*.py"))
    assert "get_map" not in source
    assert "_kernels" not in source


def test_pickles_made_before_the_simplex_route_load() -> None:
    merge = LearnedMerge([make_net(k) for k in range(2)], map="sparsemax", init=[0.7, 0.3])
    old = pickle.loads(pickle.dumps(merge))
    del old.__dict__["simplex"]  # what a pickle of the earlier class holds
    del old.__dict__["buffer_policy"]
    clone = pickle.loads(pickle.dumps(old))
    torch.testing.assert_close(clone.weights, torch.tensor([0.7, 0.3]))
    assert clone.buffer_policy == "first"
    assert type(merge).__module__ == "convexmix.merge"


def test_digits_adamerging_exports_a_config_that_merges_to_the_same_model(
    tmp_path: Path,
) -> None:
    """The docs' walk-through: learn layer-wise coefficients without labels, export the
    configuration, merge the checkpoints."""
    pytest.importorskip("sklearn")
    pytest.importorskip("yaml")
    import importlib.util

    path = Path(__file__).parents[2] / "examples" / "digits_adamerging.py"
    spec = importlib.util.spec_from_file_location("digits_adamerging", path)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(seeds=1, epochs=2, steps=10, verbose=False, lr=0.01)
    diff = example.export(res["runs"][0], str(tmp_path))
    assert diff < 1e-6
    assert (tmp_path / "adamerging.yml").read_text().startswith("merge_method: task_arithmetic")
