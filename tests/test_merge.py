"""cx.merge.LearnedMerge: merged values, no ingredient gradients, shapes, export, errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import convexmix as cx
from convexmix.merge import LearnedMerge


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def nets() -> list[nn.Module]:
    return [make_net(s) for s in range(3)]


@pytest.mark.parametrize(
    ("granularity", "shape"), [("global", (3,)), ("per_tensor", (6, 3)), ("per_module", (3, 3))]
)
def test_weights_shapes_and_merged_values(
    nets: list[nn.Module], granularity: str, shape: tuple[int, ...]
) -> None:
    merge = LearnedMerge(nets, granularity=granularity)  # type: ignore[arg-type]
    with torch.no_grad():
        merge.free.normal_()
    w = merge.weights
    assert w.shape == shape
    torch.testing.assert_close(w.sum(-1), torch.ones(shape[:-1]))
    names = [n for n, _ in nets[0].named_parameters()]
    assert merge.param_names == names
    merged = merge.merged_state_dict()
    for i, name in enumerate(names):
        if granularity == "global":
            row = w
        elif granularity == "per_tensor":
            row = w[i]
        else:
            row = w[merge.group_names.index(name.rsplit(".", 1)[0])]
        manual = sum(row[k] * dict(nets[k].named_parameters())[name] for k in range(3))
        torch.testing.assert_close(merged[name], manual.detach())
    if granularity == "per_module":
        assert merge.group_names == ["0", "1", "3"]


def test_training_touches_only_the_weights(nets: list[nn.Module]) -> None:
    before = [copy.deepcopy(n.state_dict()) for n in nets]
    merge = LearnedMerge(nets, granularity="per_tensor")
    assert [n for n, _ in merge.named_parameters()] == ["free"]
    opt = torch.optim.SGD(merge.parameters(), lr=0.5)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(merge(x), y).backward()
        opt.step()
    assert merge.free.grad is not None
    assert merge.free.grad.abs().sum() > 0
    for net, state in zip(nets, before, strict=True):
        for name, p in net.named_parameters():
            assert p.grad is None
            torch.testing.assert_close(p, state[name])
        for name, b in net.named_buffers():  # BatchNorm statistics: the merge's own copy
            torch.testing.assert_close(b, state[name])
    assert not torch.equal(merge.net[1].running_mean, before[0]["1.running_mean"])
    for xs in merge.__dict__["_ingredients"].values():
        assert all(not x.requires_grad for x in xs)


def test_gradient_matches_a_manual_merge(nets: list[nn.Module]) -> None:
    for n in nets:
        n.double()
    merge = LearnedMerge(nets, init=[0.2, 0.5, 0.3]).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    merge.eval()
    loss = merge(x).square().sum()
    loss.backward()
    free = merge.free.detach().clone().requires_grad_()
    w = torch.softmax(free, 0)
    params = {
        n: sum(w[k] * dict(nets[k].named_parameters())[n].detach() for k in range(3))
        for n, _ in nets[0].named_parameters()
    }
    buffers = dict(nets[0].named_buffers())
    ref = torch.func.functional_call(nets[0].eval(), {**params, **buffers}, (x,))
    ref.square().sum().backward()
    torch.testing.assert_close(merge.free.grad, free.grad)


def test_export_has_identical_outputs(nets: list[nn.Module]) -> None:
    merge = LearnedMerge(nets, granularity="per_module", buffers="mean")
    with torch.no_grad():
        merge.free.normal_()
    merge.eval()
    x = torch.randn(10, 4)
    plain = merge.merged_model().eval()
    torch.testing.assert_close(plain(x), merge(x))
    fresh = make_net(99).eval()
    fresh.load_state_dict(merge.merged_state_dict())
    torch.testing.assert_close(fresh(x), merge(x))
    mean = torch.stack([n[1].running_mean for n in nets]).mean(0)  # type: ignore[index]
    torch.testing.assert_close(merge.merged_state_dict()["1.running_mean"], mean)


def test_state_dicts_with_template_and_round_trips(nets: list[nn.Module]) -> None:
    states = [n.state_dict() for n in nets]
    merge = LearnedMerge(states, template=make_net(7), init=[0.6, 0.4, 0.0], map="sparsemax")
    torch.testing.assert_close(merge.weights, torch.tensor([0.6, 0.4, 0.0]))
    assert set(merge.state_dict()) == {
        "free",
        "net.1.running_mean",
        "net.1.running_var",
        "net.1.num_batches_tracked",
    }
    clone = pickle.loads(pickle.dumps(merge))
    x = torch.randn(5, 4)
    merge.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), merge(x))


def test_parents_that_read_a_childs_weight() -> None:
    """MultiheadAttention reads out_proj.weight without calling out_proj."""
    torch.manual_seed(0)
    models = [nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2)]
    merge = LearnedMerge(models, granularity="per_module", init=[0.3, 0.7]).eval()
    x = torch.randn(2, 5, 8)
    plain = merge.merged_model().eval()
    torch.testing.assert_close(merge(x, x, x)[0], plain(x, x, x)[0])
    weight = 0.3 * models[0].out_proj.weight + 0.7 * models[1].out_proj.weight
    torch.testing.assert_close(plain.out_proj.weight, weight.detach())


def test_merged_tensors_are_built_when_read(nets: list[nn.Module]) -> None:
    """Each layer's merge runs right before the layer: its backward then frees the
    layer's gradient at once, instead of keeping all of them until the end."""
    merge = LearnedMerge(nets)
    order: list[str] = []
    for name, module in merge.net.named_modules():
        module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
    reads = []
    original = merge._tensor

    def spy(i: int) -> torch.Tensor:
        reads.append((len(order), merge.param_names[i]))
        return original(i)

    merge._tensor = spy  # type: ignore[method-assign]
    merge(torch.randn(4, 4))
    first_read = {name: when for when, name in reversed(reads)}
    assert first_read["0.weight"] < first_read["3.weight"]
    assert first_read["3.weight"] == order.index("3") + 1


def test_compile_fullgraph(nets: list[nn.Module]) -> None:
    merge = LearnedMerge(nets).eval()
    x = torch.randn(6, 4)
    compiled = torch.compile(merge, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), merge(x))


def test_errors(nets: list[nn.Module]) -> None:
    other = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(
        cx.ShapeError, match=r"models\[2\].*3\.weight: \(5, 8\) \(expected \(3, 8\)\)"
    ):
        LearnedMerge([*nets[:2], other])
    short = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(cx.ShapeError, match=r"models\[1\].*missing \['1\.weight'"):
        LearnedMerge([nets[0], short])
    with pytest.raises(cx.ShapeError, match=r"unexpected \['extra'\]"):
        LearnedMerge([nets[0], {**nets[1].state_dict(), "extra": torch.zeros(1)}])
    with pytest.raises(cx.ConvexMixError, match="granularity must be"):
        LearnedMerge(nets, granularity="per_layer")  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixError, match="template="):
        LearnedMerge([n.state_dict() for n in nets])
    with pytest.raises(cx.InvalidProbabilitiesError, match="not logits"):
        LearnedMerge(nets, init=[2.0, -1.0, 0.0])
    with pytest.raises(cx.ShapeError, match="init must be"):
        LearnedMerge(nets, init=[0.5, 0.5])
    with pytest.raises(cx.ConvexMixError, match="sequence of K >= 1"):
        LearnedMerge(nets[0])  # type: ignore[arg-type]
