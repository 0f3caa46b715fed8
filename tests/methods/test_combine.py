"""add_weighted_adapter: every combination against a slow, obviously-correct reference written here.

Deltas are taken in the (out, in_flat) layout: Linear W, Conv kernel flattened, Embedding W^T.
Reference delta of adapter i on a layer: s_i * B_i @ A_i (factors flattened), in fp64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoraConfig

from ._helpers import hosts, mixed, rel_err

WEIGHTS = {"a": 0.7, "b": -1.3, "c": 2.0}
CONFIGS = {
    "a": dict(r=2, lora_alpha=4, target_modules=["emb", "fc1", "fc2", "conv"]),
    "b": dict(r=3, lora_alpha=3, target_modules=["fc1", "fc2", "conv"]),
    "c": dict(r=4, lora_alpha=2, use_rslora=True, target_modules=["fc2"]),
}
LAYER_INPUTS = {
    "emb": lambda g: torch.randint(0, 20, (3, 5), generator=g),
    "fc1": lambda g: torch.randn(3, 12, generator=g),
    "fc2": lambda g: torch.randn(3, 16, generator=g),
    "conv": lambda g: torch.randn(2, 3, 7, 7, generator=g),
}


def build(names=("a", "b", "c"), seed: int = 0, **overrides) -> peftkit.PeftModel:
    model = peftkit.PeftModel(mixed(seed))
    torch.manual_seed(seed + 1)
    for n in names:
        model.add_adapter(n, LoraConfig(init_lora_weights=False, **(CONFIGS[n] | overrides.get(n, {}))))
    return model


def delta(adapter) -> torch.Tensor:
    """s * B @ A by hand, (out, in_flat) fp64."""
    r = adapter.lora_A.shape[0]
    a = adapter.lora_A.detach().double().reshape(r, -1)
    b = adapter.lora_B.detach().double().reshape(-1, r)
    return adapter.scaling * b @ a


def taus(host, names) -> list[torch.Tensor]:
    return [WEIGHTS[n] * delta(host.adapters[n]) for n in names if n in host.adapters]


def combine(model, names, new: str, kind: str, **kw) -> dict[str, torch.Tensor]:
    model.add_weighted_adapter(list(names), [WEIGHTS[n] for n in names], new, combination_type=kind, **kw)
    return {p: delta(h.adapters[new]) for p, h in hosts(model).items() if new in h.adapters}


def layer_contribution(model, host, names, x) -> torch.Tensor:
    with torch.no_grad():
        model.set_active(*names)
        y = host(x)
        model.set_active()
        return (y - host(x)).double()


# ----------------------------------------------------------------------------------------------- linear / cat


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_linear_and_cat_are_exact_weighted_sums(kind):
    model = build()
    names = ("a", "b", "c")
    got = combine(model, names, "mix", kind)
    layers = hosts(model)
    assert set(got) == {"emb", "fc1", "fc2", "conv"}  # the union of the targeted subsets
    g = torch.Generator().manual_seed(5)
    for path, host in layers.items():
        want = sum(taus(host, names))
        assert rel_err(got[path], want) < 1e-5, path
        present = [n for n in names if n in host.adapters]
        assert host.adapters["mix"].lora_A.shape[0] == sum(model.configs[n].r for n in present), path
        # and as a function: the new adapter's output is the weighted sum of the adapters' outputs
        x = LAYER_INPUTS[path](g)
        mix = layer_contribution(model, host, ["mix"], x)
        parts = sum(WEIGHTS[n] * layer_contribution(model, host, [n], x) for n in present)
        assert rel_err(mix, parts) < 1e-5, path
    assert "mix" not in model.active and not any(p.requires_grad for n, p in model.named_parameters() if "mix" in n)


def test_linear_single_adapter_reproduces_it():
    model = build(("b",))
    got = combine(model, ("b",), "copy", "linear")
    for path, host in hosts(model).items():
        assert rel_err(got[path], WEIGHTS["b"] * delta(host.adapters["b"])) < 1e-6


# ----------------------------------------------------------------------------------------------- svd


def test_svd_exact_when_rank_covers_the_sum():
    model = build()
    names = ("a", "b", "c")
    got = combine(model, names, "svd9", "svd", svd_rank=sum(CONFIGS[n]["r"] for n in names))
    for path, host in hosts(model).items():
        assert rel_err(got[path], sum(taus(host, names))) < 1e-5, path


@pytest.mark.parametrize("k", [1, 2])
def test_svd_truncation_is_best_rank_k(k):
    model = build()
    names = ("a", "b", "c")
    got = combine(model, names, "low", "svd", svd_rank=k)
    for path, host in hosts(model).items():
        full = sum(taus(host, names))
        u, sv, vh = torch.linalg.svd(full, full_matrices=False)
        best = u[:, :k] @ torch.diag(sv[:k]) @ vh[:k]
        assert host.adapters["low"].lora_A.shape[0] == k, path
        assert rel_err(got[path], best) < 1e-4, path
        if sv[k] > 1e-3 * sv[0]:  # the sum has rank > k here (not on emb with k = 2: only r=2 adapter a)
            assert rel_err(got[path], full) > 1e-2, path


def test_svd_default_rank_is_max_r():
    model = build(("a", "b"))
    combine(model, ("a", "b"), "d", "svd")
    assert {h.adapters["d"].lora_A.shape[0] for h in hosts(model).values() if "d" in h.adapters} == {3}


# ----------------------------------------------------------------------------------------------- references


def _prune(vals: list[float], density: float) -> list[float]:
    """Keep the round(density * n) largest |v| (n * density is an integer for every layer used here)."""
    n = len(vals)
    k = density * n
    assert abs(k - round(k)) < 1e-9
    order = sorted(range(n), key=lambda i: -abs(vals[i]))
    keep = set(order[: round(k)])
    return [v if i in keep else 0.0 for i, v in enumerate(vals)]


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _elect_merge(columns: list[list[float]], method: str) -> list[float]:
    out = []
    for j in range(len(columns[0])):
        col = [c[j] for c in columns]
        vote = sum(col) if method == "total" else sum(_sign(v) for v in col)
        elected = 1 if vote >= 0 else -1
        agree = [v for v in col if v != 0 and _sign(v) == elected]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return out


def reference(kind: str, tensors: list[torch.Tensor], density: float, method: str = "total",
              masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    shape = tensors[0].shape
    flat = [t.flatten().tolist() for t in tensors]
    if kind == "ties":
        merged = _elect_merge([_prune(f, density) for f in flat], method)
    elif kind == "magnitude_prune":
        pruned = [_prune(f, density) for f in flat]
        merged = [sum(col) for col in zip(*pruned, strict=True)]
    else:  # dare: drop with the given masks, rescale by 1 / density
        dropped = [[v / density if keep else 0.0 for v, keep in zip(f, m.flatten().tolist(), strict=True)]
                   for f, m in zip(flat, masks, strict=True)]
        if kind == "dare_ties":
            merged = _elect_merge(dropped, method)
        else:
            merged = [sum(col) for col in zip(*dropped, strict=True)]
    return torch.tensor(merged, dtype=torch.float64).reshape(shape)


@pytest.mark.parametrize("kind,density,method", [
    ("ties", 0.5, "total"),
    ("ties", 0.25, "frequency"),
    ("ties", 0.75, "total"),
    ("magnitude_prune", 0.25, "total"),
    ("magnitude_prune", 0.5, "total"),
])
def test_ties_and_magnitude_prune_match_reference(kind, density, method):
    model = build()
    names = ("a", "b", "c")
    got = combine(model, names, "m", kind, density=density, majority_sign_method=method, svd_rank=64)
    for path, host in hosts(model).items():
        want = reference(kind, taus(host, names), density, method)
        assert rel_err(got[path], want) < 1e-4, path
        assert rel_err(got[path], sum(taus(host, names))) > 1e-2, path  # pruning/election changed it


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("seed", [0, 11])
def test_dare_matches_reference_with_same_masks(kind, seed):
    """One layer, so the mask order is unambiguous: one torch.rand(out, in) per adapter, in `adapters` order."""
    torch.manual_seed(0)
    model = peftkit.PeftModel(OneLinear())
    for n, r in (("a", 2), ("b", 3)):
        model.add_adapter(n, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], init_lora_weights=False))
    density = 0.4
    got = combine(model, ("a", "b"), "d", kind, density=density, seed=seed, svd_rank=64)["lin"]
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand((12, 16), generator=gen) < density for _ in range(2)]
    want = reference(kind, taus(model.model.lin, ("a", "b")), density, masks=masks)
    assert rel_err(got, want) < 1e-4


def test_dare_statistics():
    torch.manual_seed(0)
    model = peftkit.PeftModel(nn.Sequential(nn.Linear(64, 64)))
    model.add_adapter("a", LoraConfig(r=8, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    density = 0.3
    got = combine(model, ("a",), "d", "dare_linear", density=density, svd_rank=64)["0"]
    tau = WEIGHTS["a"] * delta(model.model[0].adapters["a"])
    tol = 1e-4 * tau.abs().max().item() / density
    kept = (got - tau / density).abs() < tol
    dropped = got.abs() < tol
    assert bool((kept | dropped).all())  # every entry is either dropped or rescaled by exactly 1 / density
    clear = tau.abs() > 10 * tol  # entries where kept and dropped cannot be confused
    fraction = (kept & clear).sum().item() / clear.sum().item()
    n = clear.sum().item()
    assert abs(fraction - density) < 5 * math.sqrt(density * (1 - density) / n)
    # same seed, same result; another seed, another mask
    again = combine(model, ("a",), "d2", "dare_linear", density=density, svd_rank=64)["0"]
    other = combine(model, ("a",), "d3", "dare_linear", density=density, svd_rank=64, seed=1)["0"]
    assert rel_err(again, got) < 1e-6
    assert rel_err(other, got) > 0.1


def test_density_one_is_exact():
    model = build()
    names = ("a", "b", "c")
    dl = combine(model, names, "dl", "dare_linear", density=1.0, svd_rank=64)
    dt = combine(model, names, "dt", "dare_ties", density=1.0, svd_rank=64)
    ti = combine(model, names, "ti", "ties", density=1.0, svd_rank=64)
    mp = combine(model, names, "mp", "magnitude_prune", density=1.0, svd_rank=64)
    for path, host in hosts(model).items():
        t = taus(host, names)
        assert rel_err(dl[path], sum(t)) < 1e-5, path
        assert rel_err(mp[path], sum(t)) < 1e-5, path
        elected = reference("ties", t, 1.0)
        assert rel_err(dt[path], elected) < 1e-5, path
        assert rel_err(ti[path], elected) < 1e-5, path


# ----------------------------------------------------------------------------------------------- DoRA


def test_dora_linear_and_cat_raise():
    model = build(("a",), a={"use_dora": True})
    model.add_adapter("b", LoraConfig(init_lora_weights=False, **CONFIGS["b"]))
    for kind in ("linear", "cat"):
        with pytest.raises(peftkit.ConfigError) as info:
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type=kind)
        assert info.value.field == "combination_type"
        assert "x" not in model.configs and not any("x" in h.adapters for h in hosts(model).values())


def test_dora_svd_reproduces_the_dora_layer():
    model = build(("a",), a={"use_dora": True})
    with torch.no_grad():
        for h in hosts(model).values():
            h.adapters["a"].lora_magnitude_vector.mul_(1.5)
    model.add_weighted_adapter(["a"], [1.0], "s", combination_type="svd", svd_rank=64)
    g = torch.Generator().manual_seed(2)
    for path, host in hosts(model).items():
        ad = host.adapters["a"]
        w = host.ops.weight2d().detach().double()
        v = w + delta(ad)
        m = ad.lora_magnitude_vector.detach().double().reshape(-1)
        want = (m / torch.linalg.norm(v, dim=1))[:, None] * v - w  # diag(m / n)(W + sBA) - W
        assert rel_err(delta(host.adapters["s"]), want) < 1e-4, path
        x = LAYER_INPUTS[path](g)
        assert rel_err(layer_contribution(model, host, ["s"], x), layer_contribution(model, host, ["a"], x)) < 1e-4


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_named_errors():
    model = build(("a", "b"))
    with pytest.raises(peftkit.ConfigError) as info:
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type="average")
    assert info.value.field == "combination_type"
    with pytest.raises(peftkit.ConfigError) as info:
        model.add_weighted_adapter(["a", "b"], [1.0], "x", combination_type="linear")
    assert info.value.field == "weights"
    for kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        with pytest.raises(peftkit.ConfigError) as info:
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type=kind)
        assert info.value.field == "density"
    with pytest.raises(peftkit.AdapterNameError):
        model.add_weighted_adapter(["a", "nope"], [1.0, 1.0], "x", combination_type="linear")
    assert set(model.configs) == {"a", "b"}


def test_native_function_equals_facade():
    from peftkit.methods.combine import add_weighted_adapter

    model = build(("a", "b"))
    add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "native", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "facade", combination_type="cat")
    for path, host in hosts(model).items():
        assert torch.equal(delta(host.adapters["native"]), delta(host.adapters["facade"])), path


# ----------------------------------------------------------------------------------------------- known bugs


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)


class _Nested(nn.Module):
    """Two modules named `fc`, one path a dot-suffix of the other: `fc` and `enc.fc`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.enc = _Inner()


@pytest.mark.parametrize("second", ["b", None])
def test_combine_when_one_path_is_a_suffix_of_another(second):
    torch.manual_seed(0)
    model = peftkit.PeftModel(_Nested())
    model.add_adapter("a", LoraConfig(r=2, target_modules=["fc"] if second else "fc", init_lora_weights=False))
    names = ["a"]
    if second:  # fullmatch regex: only the top-level fc
        model.add_adapter("b", LoraConfig(r=3, target_modules="fc", init_lora_weights=False))
        names.append("b")
    model.add_weighted_adapter(names, [1.0] * len(names), "mix", combination_type="cat")
    for path, host in hosts(model).items():
        present = [n for n in names if n in host.adapters]
        assert ("mix" in host.adapters) == bool(present), path
        if present:
            want = sum(delta(host.adapters[n]) for n in present)
            assert rel_err(delta(host.adapters["mix"]), want) < 1e-5, path


def test_linear_combination_keeps_lora_bias():
    model = build(("a", "b"), a={"lora_bias": True}, b={"lora_bias": True})
    with torch.no_grad():
        for h in hosts(model).values():
            for ad in h.adapters.values():
                if ad.lora_B_bias is not None:
                    ad.lora_B_bias.normal_()
    model.add_weighted_adapter(["a", "b"], [WEIGHTS["a"], WEIGHTS["b"]], "mix", combination_type="linear")
    g = torch.Generator().manual_seed(5)
    for path in ("fc1", "fc2"):
        host = hosts(model)[path]
        x = LAYER_INPUTS[path](g)
        parts = sum(WEIGHTS[n] * layer_contribution(model, host, [n], x) for n in ("a", "b"))
        assert rel_err(layer_contribution(model, host, ["mix"], x), parts) < 1e-5, path
