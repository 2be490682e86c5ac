"""cx.merge.LearnedMerge: merged values, no ingredient gradients, shapes, export, errors."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------- task arithmetic


def manual_task_arithmetic(
    merge: LearnedMerge, nets: list[nn.Module], base: nn.Module
) -> dict[str, torch.Tensor]:
    """theta_base + s_g sum_k w_{g,k} (theta_k - theta_base), tensor by tensor."""
    w, s = merge.weights.detach(), merge.scale.detach()
    base_p = dict(base.named_parameters())
    out = {}
    for i, name in enumerate(merge.param_names):
        if merge.granularity == "global":
            g, row = 0, w
        else:
            g = (
                i
                if merge.granularity == "per_tensor"
                else merge.group_names.index(name.rsplit(".", 1)[0])
            )
            row = w[g]
        scale = s if s.dim() == 0 else s[g]
        tau = sum(
            row[k] * (dict(nets[k].named_parameters())[name] - base_p[name])
            for k in range(len(nets))
        )
        out[name] = (base_p[name] + scale * tau).detach()
    return out


@pytest.mark.parametrize("granularity", ["global", "per_tensor", "per_module"])
@pytest.mark.parametrize("scale", [0.3, 1.7, -0.5, "learn", "learn_per_group"])
def test_task_arithmetic_matches_the_formula(
    nets: list[nn.Module], granularity: str, scale: float | str
) -> None:
    base = make_net(10)
    merge = LearnedMerge(
        nets,
        granularity=granularity,  # type: ignore[arg-type]
        base=base,
        scale=scale,  # type: ignore[arg-type]
        scale_init=0.8,
    )
    with torch.no_grad():
        merge.free.normal_()
        if merge.log_scale is not None:
            merge.log_scale.normal_(0, 0.5)
    if scale == "learn_per_group" and granularity != "global":
        assert merge.scale.shape == (len(merge.group_names),)
    else:
        assert merge.scale.shape == ()
    manual = manual_task_arithmetic(merge, nets, base)
    merged = merge.merged_state_dict()
    for name in merge.param_names:
        torch.testing.assert_close(merged[name], manual[name])
    # forward runs the same merge; the export has the same outputs
    merge.eval()
    x = torch.randn(7, 4)
    ref = torch.func.functional_call(
        make_net(0).eval(), {**manual, **dict(merge.net.named_buffers())}, (x,)
    )
    torch.testing.assert_close(merge(x), ref)
    torch.testing.assert_close(merge.merged_model().eval()(x), ref)


@pytest.mark.parametrize("granularity", ["global", "per_tensor", "per_module"])
def test_scale_one_is_the_convex_soup(nets: list[nn.Module], granularity: str) -> None:
    init = [0.2, 0.3, 0.5]
    soup = LearnedMerge(nets, granularity=granularity, init=init)  # type: ignore[arg-type]
    fixed = LearnedMerge(
        nets,
        granularity=granularity,  # type: ignore[arg-type]
        init=init,
        base=make_net(10),
        scale=1.0,
    )
    learned = LearnedMerge(
        nets,
        granularity=granularity,  # type: ignore[arg-type]
        init=init,
        base=make_net(10),
        scale="learn",
    )
    assert float(learned.scale.detach()) == 1.0
    a, b, c = soup.merged_state_dict(), fixed.merged_state_dict(), learned.merged_state_dict()
    for name in soup.param_names:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
        torch.testing.assert_close(c[name], a[name])


def test_base_is_held_by_reference_without_gradients(nets: list[nn.Module]) -> None:
    base = make_net(10)
    before = copy.deepcopy(base.state_dict())
    merge = LearnedMerge(nets, base=base, scale="learn", granularity="per_module")
    held = merge.__dict__["_base"]
    for name, p in base.named_parameters():
        assert held[name].data_ptr() == p.data_ptr()  # a view, not a copy
        assert not held[name].requires_grad
    assert [n for n, _ in merge.named_parameters()] == ["free", "log_scale"]
    assert "log_scale" in merge.state_dict()
    opt = torch.optim.SGD(merge.parameters(), lr=0.5)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(merge(x), y).backward()
        opt.step()
    assert merge.log_scale is not None
    assert merge.log_scale.grad is not None
    assert float(merge.log_scale.grad.abs().sum()) > 0
    for name, p in base.named_parameters():
        assert p.grad is None
        torch.testing.assert_close(p, before[name])
    clone = pickle.loads(pickle.dumps(merge))
    merge.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), merge(x))
    torch.testing.assert_close(clone.scale, merge.scale)


def test_gradient_of_the_scale_matches_a_manual_merge(nets: list[nn.Module]) -> None:
    for n in nets:
        n.double()
    base = make_net(10).double()
    merge = LearnedMerge(
        nets, base=base, scale="learn", scale_init=0.7, init=[0.2, 0.5, 0.3]
    ).double()
    merge.eval()
    x = torch.randn(16, 4, dtype=torch.float64)
    merge(x).square().sum().backward()
    free = merge.free.detach().clone().requires_grad_()
    log_s = torch.tensor([math.log(0.7)], dtype=torch.float64, requires_grad=True)
    w, s = torch.softmax(free, 0), log_s.exp()[0]
    b = dict(base.named_parameters())
    params = {
        n: b[n].detach()
        + s * sum(w[k] * (dict(nets[k].named_parameters())[n] - b[n]).detach() for k in range(3))
        for n in b
    }
    ref = torch.func.functional_call(
        nets[0].eval(), {**params, **dict(nets[0].named_buffers())}, (x,)
    )
    ref.square().sum().backward()
    torch.testing.assert_close(merge.free.grad, free.grad)
    assert merge.log_scale is not None
    torch.testing.assert_close(merge.log_scale.grad, log_s.grad)


@pytest.mark.parametrize(
    ("map_name", "tol", "w0"), [("sparsemax", 0.005, 1.0), ("softmax", 0.05, 0.95)]
)
def test_learned_scale_recovers_an_extrapolation(map_name: str, tol: float, w0: float) -> None:
    """target = base + 1.5 (theta_0 - base): the merge learns scale 1.5 and w_0 = 1
    (exactly 1 with sparsemax; softmax only approaches the vertex)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    models = [nn.Linear(6, 4) for _ in range(3)]
    target = nn.Linear(6, 4)
    with torch.no_grad():
        for p_t, p_b, p_0 in zip(
            target.parameters(), base.parameters(), models[0].parameters(), strict=True
        ):
            p_t.copy_(p_b + 1.5 * (p_0 - p_b))
    merge = LearnedMerge(models, base=base, scale="learn", map=map_name)
    opt = torch.optim.Adam(merge.parameters(), lr=0.1)
    x = torch.randn(256, 6)
    y = target(x).detach()
    for _ in range(150):
        opt.zero_grad()
        (merge(x) - y).square().mean().backward()
        opt.step()
    assert float(merge.scale.detach()) == pytest.approx(1.5, abs=tol)
    assert float(merge.weights[0].detach()) >= w0


def test_task_arithmetic_errors(nets: list[nn.Module]) -> None:
    with pytest.raises(cx.ConvexMixError, match="needs base="):
        LearnedMerge(nets, scale=0.5)
    with pytest.raises(cx.ConvexMixError, match="needs base="):
        LearnedMerge(nets, scale="learn")
    with pytest.raises(cx.ConvexMixError, match="scale must be a float, 'learn'"):
        LearnedMerge(nets, base=nets[0], scale="learned")  # type: ignore[arg-type]
    with pytest.raises(cx.ConvexMixError, match="scale must be finite"):
        LearnedMerge(nets, base=nets[0], scale=float("nan"))
    with pytest.raises(cx.ConvexMixError, match="scale_init must be"):
        LearnedMerge(nets, base=nets[0], scale="learn", scale_init=0.0)
    other = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(cx.ShapeError, match=r"base does not match.*3\.weight: \(5, 8\)"):
        LearnedMerge(nets, base=other, scale=0.5)
    with pytest.raises(cx.ConvexMixError, match=r"base: tensor '0\.weight' has dtype"):
        LearnedMerge(nets, base=make_net(10).double(), scale=0.5)
    with pytest.raises(cx.ConvexMixError, match=r"models\[1\]: tensor '0\.weight' has dtype"):
        LearnedMerge([nets[0], make_net(5).double()])


# ---------------------------------------------------------------- entropy_loss


def test_entropy_loss_matches_its_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 10, dtype=torch.float64) * 3
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    expected = (-(p * torch.log(p)).sum(-1)).mean()
    torch.testing.assert_close(cx.merge.entropy_loss(logits), expected)
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.entropy(p.reshape(-1, 10).numpy(), axis=1).mean()
    assert float(cx.merge.entropy_loss(logits)) == pytest.approx(ref, rel=1e-12)
    uniform = cx.merge.entropy_loss(torch.zeros(3, 4))
    torch.testing.assert_close(uniform, torch.tensor(math.log(4)))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cx.merge.entropy_loss, (x,))


def test_entropy_loss_is_stable() -> None:
    big = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], requires_grad=True)
    loss = cx.merge.entropy_loss(big)
    loss.backward()
    assert torch.isfinite(loss)
    assert big.grad is not None
    assert torch.isfinite(big.grad).all()
    torch.testing.assert_close(loss, torch.tensor(math.log(3) / 2))
    masked = torch.tensor([[0.0, 0.0, -math.inf]], requires_grad=True)
    loss = cx.merge.entropy_loss(masked)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert masked.grad is not None
    assert torch.isfinite(masked.grad).all()
    half = cx.merge.entropy_loss(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.tensor(math.log(8)))
    with pytest.raises(cx.ConvexMixError, match="floating point"):
        cx.merge.entropy_loss(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(cx.ShapeError, match=r"got shape \(\)"):
        cx.merge.entropy_loss(torch.tensor(1.0))


# ---------------------------------------------------------------- from_safetensors


def save_safetensors(model: nn.Module, path: Path) -> Path:
    st = pytest.importorskip("safetensors.torch")
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("granularity", ["global", "per_tensor", "per_module"])
def test_from_safetensors_equals_the_in_memory_merge(
    nets: list[nn.Module], tmp_path: Path, granularity: str
) -> None:
    base = make_net(10)
    paths = [save_safetensors(n, tmp_path / f"m{k}.safetensors") for k, n in enumerate(nets)]
    base_path = save_safetensors(base, tmp_path / "base.safetensors")
    kw = {"granularity": granularity, "scale": "learn", "scale_init": 0.6, "buffers": "mean"}
    disk = LearnedMerge.from_safetensors(paths, make_net(99), base=base_path, **kw)
    memory = LearnedMerge(nets, base=base, template=make_net(99), **kw)  # type: ignore[arg-type]
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for merge in (disk, memory):
        nn.functional.cross_entropy(merge(x), y).backward()
    torch.testing.assert_close(disk.free.grad, memory.free.grad)
    assert disk.log_scale is not None
    assert memory.log_scale is not None
    torch.testing.assert_close(disk.log_scale.grad, memory.log_scale.grad)
    a, b = disk.merged_state_dict(), memory.merged_state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    soup = LearnedMerge.from_safetensors([str(p) for p in paths], make_net(99))
    torch.testing.assert_close(
        soup.merged_state_dict()["3.weight"],
        sum(n.state_dict()["3.weight"] for n in nets) / 3,  # type: ignore[arg-type]
    )


def test_from_safetensors_errors_name_the_file_and_tensor(
    nets: list[nn.Module], tmp_path: Path
) -> None:
    good = save_safetensors(nets[0], tmp_path / "good.safetensors")
    wide = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    bad_shape = save_safetensors(wide, tmp_path / "wide.safetensors")
    bad_dtype = save_safetensors(make_net(3).double(), tmp_path / "double.safetensors")
    st = pytest.importorskip("safetensors.torch")
    partial = tmp_path / "partial.safetensors"
    st.save_file({"0.weight": torch.zeros(8, 4)}, str(partial))
    extra = tmp_path / "extra.safetensors"
    st.save_file({**nets[1].state_dict(), "head.weight": torch.zeros(2)}, str(extra))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    template = make_net(99)
    with pytest.raises(
        cx.ShapeError, match=r"wide\.safetensors.*tensor '3\.weight' has shape \(5, 8\), but"
    ):
        LearnedMerge.from_safetensors([good, bad_shape], template)
    with pytest.raises(
        cx.ShapeError, match=r"double\.safetensors.*tensor '0\.weight' has dtype torch\.float64"
    ):
        LearnedMerge.from_safetensors([good, bad_dtype], template)
    with pytest.raises(
        cx.ShapeError, match=r"double\.safetensors.*dtype torch\.float64, but the template's"
    ):
        LearnedMerge.from_safetensors([good], template, base=bad_dtype, scale=0.5)
    with pytest.raises(
        cx.ShapeError, match=r"partial\.safetensors.*missing tensor\(s\) \['0\.bias'"
    ):
        LearnedMerge.from_safetensors([good, partial], template)
    with pytest.raises(cx.ShapeError, match=r"extra\.safetensors.*unexpected.*'head\.weight'"):
        LearnedMerge.from_safetensors([good, extra], template)
    with pytest.raises(cx.ConvexMixError, match=r"garbage\.safetensors.*not a readable"):
        LearnedMerge.from_safetensors([good, garbage], template)
    with pytest.raises(cx.ConvexMixError, match=r"nope\.safetensors.*no such file"):
        LearnedMerge.from_safetensors([good, tmp_path / "nope.safetensors"], template)
    with pytest.raises(cx.ConvexMixError, match="sequence of K >= 1"):
        LearnedMerge.from_safetensors(good, template)  # type: ignore[arg-type]


MEMORY_SCRIPT = r"""
import gc, json, os, re, sys, threading, time
import torch
from torch import nn
import convexmix as cx
from safetensors.torch import load_file

def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

folder, k = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
template = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)])
x = torch.randn(8, 1024)
# warm-up on a tiny merge pays torch's and convexmix's one-off set-up
tiny = cx.merge.LearnedMerge([nn.Linear(4, 4)] * 2, base=nn.Linear(4, 4), scale="learn")
tiny(torch.randn(2, 4)).sum().backward()
paths = [os.path.join(folder, f"m{i}.safetensors") for i in range(k)]
base = os.path.join(folder, "base.safetensors")

def peak_of(build):
    start = anon()
    peak = [start]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    merge = build()
    for _ in range(2):
        out = merge(x)
        peak[0] = max(peak[0], anon())
        out.square().mean().backward()
        peak[0] = max(peak[0], anon())
    stop.set()
    thread.join()
    del merge, out
    gc.collect()
    return peak[0] - start

def disk():
    return cx.merge.LearnedMerge.from_safetensors(paths, template, base=base, scale="learn")

def memory():  # the control: the same files loaded into memory
    load = lambda p: {n: t.clone() for n, t in load_file(p).items()}
    return cx.merge.LearnedMerge(
        [load(p) for p in paths], template=template, base=load(base), scale="learn"
    )

one = sum(p.numel() * p.element_size() for p in template.parameters())
print(json.dumps({"disk": peak_of(disk), "memory": peak_of(memory), "one": one}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_from_safetensors_peak_anonymous_memory(tmp_path: Path) -> None:
    """K = 8 ingredients of 12 MiB on disk: the step's anonymous memory stays within 3
    model copies (loading the files instead costs K + 1 copies, checked as a control)."""
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    for i in range(9):
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)])
        name = "base" if i == 8 else f"m{i}"
        st.save_file(model.state_dict(), str(tmp_path / f"{name}.safetensors"))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), "8"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["disk"] < 3 * peaks["one"], peaks
    assert peaks["memory"] > 8 * peaks["one"], peaks  # the control: the measure sees copies
