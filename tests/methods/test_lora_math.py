"""LoRA (spec 1.1) and rsLoRA (1.2): forward, inits, dropout, lora_bias, per-module patterns and targeting.

Every check is against closed-form math written out here, or against real peft on the same tiny model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import LoraConfig

from ._helpers import both, close, hosts, peft_lora_modules, tiny_llama


class OneLinear(nn.Module):
    def __init__(self, d_in: int = 16, d_out: int = 12, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def one_linear(seed: int = 0, **kw) -> OneLinear:
    torch.manual_seed(seed)
    return OneLinear(**kw)


def wrap(base: nn.Module, **config) -> peftkit.PeftModel:
    return peftkit.get_peft_model(base, LoraConfig(**config))


def factors(model, path: str = "lin", name: str = "default"):
    host = model.model.get_submodule(path)
    ad = host.adapters[name]
    return host, ad


# ------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_closed_form(rslora):
    r, alpha = 4, 6.0
    model = wrap(one_linear(), target_modules=["lin"], r=r, lora_alpha=alpha, use_rslora=rslora,
                 init_lora_weights=False)
    host, ad = factors(model)
    w, b = host.base_layer.weight, host.base_layer.bias
    a_, b_ = ad.lora_A, ad.lora_B
    assert a_.shape == (r, 16) and b_.shape == (12, r)
    s = alpha / (math.sqrt(r) if rslora else r)
    x = torch.randn(5, 3, 16)
    expected = x @ w.T + b + s * (x @ a_.T @ b_.T)
    got = model(x)
    assert close(got, expected)
    # the adapter branch really contributes (not a vacuous equality)
    assert (got - (x @ w.T + b)).abs().max() > 1e-2


def test_embedding_forward_closed_form():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(30, 10))
    model = wrap(base, target_modules=["0"], r=3, lora_alpha=5, init_lora_weights=False)
    host, ad = factors(model, "0")
    assert ad.lora_A.shape == (3, 30) and ad.lora_B.shape == (10, 3)
    ids = torch.randint(0, 30, (4, 7))
    e = host.base_layer.weight  # (30, 10)
    onehot = F.one_hot(ids, 30).float()  # (4, 7, 30)
    expected = e[ids] + (5 / 3) * (onehot @ ad.lora_A.T @ ad.lora_B.T)
    assert close(model(ids), expected)


def test_conv2d_forward_closed_form():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1))
    model = wrap(base, target_modules=["0"], r=2, lora_alpha=3, init_lora_weights=False)
    host, ad = factors(model, "0")
    conv = host.base_layer
    assert ad.lora_A.shape == (2, 3, 3, 3) and ad.lora_B.shape == (5, 2, 1, 1)
    x = torch.randn(2, 3, 9, 9)
    # the delta kernel is s * B @ A on the flattened kernel: one conv with W + s BA
    delta = (1.5 * ad.lora_B.reshape(5, 2) @ ad.lora_A.reshape(2, -1)).reshape(conv.weight.shape)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, stride=2, padding=1)
    assert close(model(x), expected)


def test_rslora_equals_lora_with_alpha_times_sqrt_r():
    r, alpha = 9, 4.0
    base = one_linear()
    rs = wrap(one_linear(), target_modules=["lin"], r=r, lora_alpha=alpha, use_rslora=True, init_lora_weights=False)
    plain = wrap(base, target_modules=["lin"], r=r, lora_alpha=alpha * math.sqrt(r), init_lora_weights=False)
    _, a_rs = factors(rs)
    _, a_pl = factors(plain)
    with torch.no_grad():
        a_pl.lora_A.copy_(a_rs.lora_A)
        a_pl.lora_B.copy_(a_rs.lora_B)
    assert a_rs.scaling == pytest.approx(alpha / 3)
    assert a_pl.scaling == pytest.approx(a_rs.scaling)
    x = torch.randn(4, 16)
    assert close(rs(x), plain(x), 1e-6)
    # and it differs from plain LoRA with the same alpha (s = alpha / r)
    plain.model.lin.adapters["default"].scaling = alpha / r
    assert not close(rs(x), plain(x), 1e-3)


# ------------------------------------------------------------------------------------------------- inits


def test_default_init_b_zero_a_kaiming_bound():
    d_in = 64
    model = wrap(one_linear(d_in=d_in, d_out=48), target_modules=["lin"], r=16, lora_alpha=16)
    host, ad = factors(model)
    bound = 1 / math.sqrt(d_in)
    assert torch.count_nonzero(ad.lora_B) == 0
    assert ad.lora_A.abs().max() <= bound
    # uniform over the full interval (1024 draws): extremes near both ends, variance bound^2 / 3
    assert ad.lora_A.max() > 0.9 * bound and ad.lora_A.min() < -0.9 * bound
    assert ad.lora_A.var().item() == pytest.approx(bound**2 / 3, rel=0.15)
    x = torch.randn(3, d_in)
    assert torch.equal(model(x), host.base_layer(x))  # B = 0: bit-exact identity at init


@pytest.mark.parametrize("r", [2, 8])
def test_gaussian_init_std_one_over_r(r):
    d_in = 1024
    model = wrap(one_linear(d_in=d_in, d_out=8), target_modules=["lin"], r=r, lora_alpha=8,
                 init_lora_weights="gaussian")
    _, ad = factors(model)
    assert torch.count_nonzero(ad.lora_B) == 0
    a = ad.lora_A.detach()
    n = a.numel()
    # std of the sample std is ~ std / sqrt(2n); allow 6 of those
    assert a.std().item() == pytest.approx(1 / r, rel=6 / math.sqrt(2 * n))
    assert abs(a.mean().item()) < 6 / (r * math.sqrt(n))


def test_embedding_default_init_a_zero_b_normal():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(50, 40))
    model = wrap(base, target_modules=["0"], r=8, lora_alpha=8)
    host, ad = factors(model, "0")
    assert torch.count_nonzero(ad.lora_A) == 0
    b = ad.lora_B.detach()
    assert b.shape == (40, 8)
    assert b.std().item() == pytest.approx(1.0, rel=0.15)
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(model(ids), host.base_layer(ids))


# ------------------------------------------------------------------------------------------------- dropout


def test_dropout_only_on_adapter_branch():
    p, r, alpha = 0.5, 4, 8
    model = wrap(one_linear(), target_modules=["lin"], r=r, lora_alpha=alpha, lora_dropout=p,
                 init_lora_weights=False)
    host, ad = factors(model)
    w, b = host.base_layer.weight, host.base_layer.bias
    x = torch.randn(6, 16)
    s = alpha / r

    def by_hand(xd):
        return x @ w.T + b + s * (xd @ ad.lora_A.T @ ad.lora_B.T)

    model.eval()
    y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    assert close(y1, by_hand(x))

    model.train()
    torch.manual_seed(7)
    yt = model(x)
    torch.manual_seed(7)
    xd = F.dropout(x, p, training=True)  # the same mask: dropout is the only random op in this forward
    assert close(yt, by_hand(xd))
    assert not close(yt, by_hand(x), 1e-3)  # the mask had an effect
    assert not torch.equal(model(x), model(x))  # fresh masks per call
    # the base part saw the undropped input: y - s*B A drop(x) is exactly the base output
    assert close(yt - s * (xd @ ad.lora_A.T @ ad.lora_B.T), x @ w.T + b)


# ------------------------------------------------------------------------------------------------- lora_bias


def test_lora_bias_forward_and_merge():
    r, alpha = 4, 12
    model = wrap(one_linear(), target_modules=["lin"], r=r, lora_alpha=alpha, lora_bias=True,
                 init_lora_weights=False)
    host, ad = factors(model)
    assert ad.lora_B_bias is not None and torch.count_nonzero(ad.lora_B_bias) == 0  # zero init
    with torch.no_grad():
        ad.lora_B_bias.normal_()
    s = alpha / r
    w0, b0 = host.base_layer.weight.detach().clone(), host.base_layer.bias.detach().clone()
    x = torch.randn(5, 16)
    expected = x @ w0.T + b0 + s * (x @ ad.lora_A.T @ ad.lora_B.T + ad.lora_B_bias)
    assert close(model(x), expected)

    model.merge_adapter()
    assert close(host.base_layer.bias, b0 + s * ad.lora_B_bias, 1e-6)
    assert close(host.base_layer.weight, w0 + s * ad.lora_B @ ad.lora_A, 1e-6)
    assert close(model(x), expected)
    model.unmerge_adapter()
    assert close(host.base_layer.bias, b0, 1e-6)
    assert close(host.base_layer.weight, w0, 1e-6)


def test_lora_bias_merge_needs_base_bias():
    model = wrap(one_linear(bias=False), target_modules=["lin"], r=2, lora_bias=True)
    with pytest.raises(peftkit.ConfigError) as info:
        model.merge_adapter()
    assert info.value.field == "lora_bias"


# ----------------------------------------------------------------------------------- patterns (vs peft)

PATTERNS = [
    dict(rank_pattern={"layers\\.0\\.self_attn\\.q_proj": 2, "v_proj": 6}, alpha_pattern={"v_proj": 3}),
    dict(rank_pattern={"model\\.layers\\.1\\.mlp\\..*_proj": 3}, alpha_pattern={"o_proj": 20, "q_proj": 5}),
    dict(rank_pattern={"k_proj": 2, "layers\\.1\\.self_attn\\.k_proj": 7}, alpha_pattern={"up_proj": 2.5}),
    dict(rank_pattern={"q_proj": 16}, alpha_pattern={"layers\\.0\\.self_attn\\.q_proj": 9}, use_rslora=True),
]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("patterns", PATTERNS, ids=range(len(PATTERNS)))
def test_rank_alpha_patterns_match_peft(llama, patterns):
    pm, km = both(llama, r=4, lora_alpha=8, target_modules="all-linear", **patterns)
    theirs = peft_lora_modules(pm)
    ours = hosts(km)
    assert set(theirs) == set(ours)
    got_r = {p: h.adapters["default"].lora_A.shape[0] for p, h in ours.items()}
    want_r = {p: m.r["default"] for p, m in theirs.items()}
    assert got_r == want_r
    got_s = {p: h.adapters["default"].scaling for p, h in ours.items()}
    want_s = {p: m.scaling["default"] for p, m in theirs.items()}
    assert got_s == pytest.approx(want_s, rel=1e-12)
    assert len(set(got_s.values())) > 1  # the patterns really changed some modules


# ---------------------------------------------------------------------------------- targeting (vs peft)

TARGETS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["mlp.up_proj", "self_attn.o_proj"]),
    dict(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj"),
    dict(target_modules=r"model\.layers\.\d\.mlp\.(up|down)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["down_proj", "k_proj"]),
    dict(target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=r"model\.layers\.0\..*"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=["o_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
]


def _targets(pm, km) -> tuple[set[str], set[str]]:
    """Adapted module paths of both, scanning every submodule (also inside module copies)."""
    from peftkit.core.host import AdaptedLayer

    ours = {n.removeprefix("model.") for n, m in km.named_modules() if isinstance(m, AdaptedLayer)}
    return set(peft_lora_modules(pm)), ours


@pytest.mark.parametrize("config", TARGETS, ids=range(len(TARGETS)))
def test_targeted_modules_match_peft(llama, config):
    pm, km = both(llama, r=2, **config)
    theirs, ours = _targets(pm, km)
    assert theirs  # a non-empty selection
    assert ours == theirs


def test_all_linear_excludes_lm_head(llama):
    pm, km = both(llama, r=2, target_modules="all-linear")
    theirs, ours = _targets(pm, km)
    assert "lm_head" not in ours
    assert len(ours) == 2 * 7 and ours == theirs


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.experts = nn.ModuleList([_Expert() for _ in range(3)])


class _Layers(nn.Module):
    """Top-level `layers` list whose blocks hold a numbered `experts` list (MoE-like names)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block() for _ in range(3)])


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Layers()


def test_layers_to_transform_nested_indices_match_peft():
    torch.manual_seed(0)
    pm, km = both(_Wrapped(), r=2, target_modules=["fc", "w1"], layers_to_transform=[1])
    theirs, ours = _targets(pm, km)
    assert theirs == {"model.layers.1.fc", *(f"model.layers.1.experts.{i}.w1" for i in range(3))}
    assert ours == theirs


def test_layers_pattern_at_top_level_matches_peft():
    import peft

    torch.manual_seed(0)
    config = dict(r=2, target_modules=["fc"], layers_to_transform=[1], layers_pattern="layers")
    theirs = set(peft_lora_modules(peft.get_peft_model(_Layers(), peft.LoraConfig(**config))))
    assert theirs == {"layers.1.fc"}
    try:
        ours = set(hosts(peftkit.get_peft_model(_Layers(), LoraConfig(**config))))
    except peftkit.NoTargetMatchedError:
        ours = set()
    assert ours == theirs


def _tiny_bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=96,
                                                    max_position_embeddings=32, num_labels=3))


def test_modules_to_save_outside_targets_match_peft(llama):
    pm, km = both(llama, r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    theirs, ours = _targets(pm, km)
    assert ours == theirs


def test_modules_to_save_are_never_adapted():
    pm, km = both(_tiny_bert_cls(), r=2, target_modules="all-linear", modules_to_save=["classifier"])
    theirs, ours = _targets(pm, km)
    assert not any("classifier" in p for p in theirs)
    assert ours == theirs


def test_seq_cls_task_type_trains_the_head_instead_of_adapting_it():
    pm, km = both(_tiny_bert_cls(), r=2, target_modules="all-linear", task_type="SEQ_CLS")
    theirs, ours = _targets(pm, km)
    assert not any("classifier" in p for p in theirs)
    assert ours == theirs
    for model in (pm, km):
        head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
        assert {tuple(p.shape) for p in head} == {(3, 32), (3,)}
