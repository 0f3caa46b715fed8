"""(IA)^3 (spec 1.22): closed forms (output side l * (W x + b), input side W (l * x) + b) on Linear, Conv1D and
Conv2d, identity at init, exact merge/unmerge (also with l_i = 0, where peft's division needs its epsilon), bias
handling, peft's feed-forward matching rule, config errors, and interop with the real peft in both directions
(same keys, shapes, parameter counts, logits within 1e-5, merged weights).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, UnsupportedLayerError
from peftkit.core.registry import config_for_peft_type
from peftkit.methods.ia3 import IA3Config

from ._helpers import close, hosts, logits, mixed, mixed_inputs, perturb, tiny_gpt2, tiny_llama, token_ids

TOL = 1e-5
# id -> (base builder, IA3Config kwargs shared by peft and peftkit)
CASES = {
    "llama": (tiny_llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "llama-regex": (tiny_llama, dict(target_modules=r".*\.(q_proj|up_proj|o_proj)",
                                     feedforward_modules=r".*\.1\.mlp\.up_proj")),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                             fan_in_fan_out=True)),
    "mixed": (mixed, dict(target_modules=["fc1", "fc2", "conv"], feedforward_modules=["fc2", "conv"])),
    # feedforward_modules=None: both libraries take the architecture's FFN output projection (down_proj, c_proj)
    "llama-ff-preset": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
    "gpt2-ff-preset": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
}


def _inputs(case: str) -> tuple[torch.Tensor, ...]:
    return mixed_inputs() if case == "mixed" else (token_ids(),)


def _peftkit(base: nn.Module, **kw) -> AdapterModel:
    model = AdapterModel(base)
    model.add_adapter("a", IA3Config(**kw))
    return model


# --- the math ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_linear_closed_form(feedforward):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    model = _peftkit(nn.Sequential(copy.deepcopy(lin)), target_modules=["0"],
                     feedforward_modules=["0"] if feedforward else None, init_ia3_weights=False)
    scale = hosts(model)["0"].adapters["a"].ia3_l.detach()
    assert scale.shape == ((1, 6) if feedforward else (5, 1))
    x = torch.randn(3, 4, 6)
    want = lin(x * scale.flatten()) if feedforward else lin(x) * scale.flatten()
    assert close(model(x), want)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_conv1d_and_conv2d_closed_forms(feedforward):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    for layer, x, shape in ((Conv1D(5, 6), torch.randn(2, 3, 6), ((1, 6) if feedforward else (5, 1))),
                            (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5),
                             ((1, 3, 1, 1) if feedforward else (1, 4, 1, 1)))):
        model = _peftkit(nn.Sequential(copy.deepcopy(layer)), target_modules=["0"],
                         feedforward_modules=["0"] if feedforward else None, init_ia3_weights=False)
        scale = hosts(model)["0"].adapters["a"].ia3_l.detach()
        assert scale.shape == shape
        lv = scale.reshape(-1) if isinstance(layer, Conv1D) else scale
        want = layer(x * lv) if feedforward else layer(x) * lv
        assert close(model(x), want)


def test_identity_at_init_is_exact():
    base, x = tiny_llama(), token_ids()
    model = _peftkit(copy.deepcopy(base), **CASES["llama"][1])
    assert torch.equal(logits(model, x), logits(base, x))
    assert all(bool((h.adapters["a"].ia3_l == 1).all()) for h in hosts(model).values())


def test_output_side_scales_the_bias_too():
    """l * (W x + b), not l * W x + b; merged: W' = diag(l) W and b' = l * b."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = _peftkit(nn.Sequential(copy.deepcopy(lin)), target_modules=["0"], init_ia3_weights=False)
    scale = hosts(model)["0"].adapters["a"].ia3_l.detach().flatten()  # (3,)
    x = torch.zeros(1, 4)
    assert close(model(x), lin.bias[None] * scale)  # W 0 = 0: only the scaled bias is left
    model.merge()
    layer = hosts(model)["0"].base_layer
    assert close(layer.weight, lin.weight * scale[:, None]) and close(layer.bias, lin.bias * scale)
    hosts(model)["0"].adapters["a"].delta_weight()  # a read while merged must not re-take the bias shift
    model.unmerge()
    assert close(layer.weight, lin.weight) and close(layer.bias, lin.bias)


# --- merging -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_exact_even_with_zero_scales(case):
    build, kw = CASES[case]
    base, x = build(), _inputs(case)
    model = _peftkit(copy.deepcopy(base), init_ia3_weights=False, **kw)
    with torch.no_grad():
        for h in hosts(model).values():
            h.adapters["a"].ia3_l.view(-1)[::3] = 0.0  # l_i = 0: no inverse; peft divides by l + 1e-8
    want = logits(model, *x)
    model.merge()
    assert close(logits(model, *x), want)
    model.unmerge()
    after = {k.replace(".base_layer", ""): v for k, v in model.model.state_dict().items() if ".adapters." not in k}
    for k, v in base.state_dict().items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0, msg=k)


def test_two_adapters_merge_like_their_sum():
    """The host adds contributions: the merged bias must add both shifts of the original b (not compound them)."""
    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)))
    for name in ("a", "b"):
        model.add_adapter(name, IA3Config(target_modules=["0", "2"], init_ia3_weights=False))
    model.set_active("a", "b")
    x = torch.randn(3, 6)
    want = model(x)
    model.merge()
    assert close(model(x), want)
    model.unmerge()
    assert close(model(x), want)


# --- peft's rules and the config ---------------------------------------------------------------------------
def test_feedforward_matching_follows_peft():
    listed = IA3Config(target_modules=["down_proj", "q_proj"], feedforward_modules=["down_proj"])
    assert listed.is_feedforward("model.layers.0.mlp.down_proj")
    assert not listed.is_feedforward("model.layers.0.self_attn.q_proj")
    suffix = IA3Config(target_modules=["proj"], feedforward_modules=["proj"])
    assert suffix.is_feedforward("a.down_proj")  # peft: plain endswith, no dot boundary
    regex = IA3Config(target_modules=r".*proj", feedforward_modules=r".*\.mlp\..*")
    assert regex.is_feedforward("model.layers.0.mlp.up_proj") and not regex.is_feedforward("x.mlp")
    assert not IA3Config(target_modules=["q"]).is_feedforward("q")


@pytest.mark.parametrize("kw,field", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "feedforward_modules"),
    (dict(target_modules=["k_proj"], feedforward_modules=[3]), "feedforward_modules"),
    (dict(target_modules=["k_proj"], init_ia3_weights="yes"), "init_ia3_weights"),
    (dict(target_modules=["k_proj"], fan_in_fan_out=None), "fan_in_fan_out"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError) as info:
        IA3Config(**kw)
    assert info.value.field == field


def test_embeddings_are_unsupported_and_registry():
    with pytest.raises(UnsupportedLayerError):
        _peftkit(nn.Sequential(nn.Embedding(10, 4)), target_modules=["0"])
    assert config_for_peft_type("IA3") is IA3Config and IA3Config(target_modules=["q"]).method == "ia3"


def test_random_init_is_normal_like_peft():
    model = _peftkit(nn.Sequential(nn.Linear(64, 64)), target_modules=["0"], init_ia3_weights=False)
    scale = hosts(model)["0"].adapters["a"].ia3_l.detach()
    assert 0.5 < scale.std().item() < 1.5 and abs(scale.mean().item()) < 0.5


# --- interop with the real peft ----------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def _peft_model(base: nn.Module, kw: dict):
    return peft.get_peft_model(base, peft.IA3Config(init_ia3_weights=False, **kw))


def _peftkit_model(base: nn.Module, kw: dict):
    return peftkit.get_peft_model(base, IA3Config(init_ia3_weights=False, **kw))


@pytest.mark.parametrize("case", CASES)
def test_peft_writes_peftkit_reads(case, tmp_path):
    build, kw = CASES[case]
    base, x = build(), _inputs(case)
    src = _peft_model(copy.deepcopy(base), kw)
    perturb(src.named_parameters(), scale=0.05)
    want = logits(src, *x)
    assert (want - logits(base, *x)).abs().max().item() > 1e-3
    src.save_pretrained(tmp_path)
    got = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (logits(got, *x) - want).abs().max().item() < TOL


@pytest.mark.parametrize("case", CASES)
def test_peftkit_writes_peft_reads(case, tmp_path):
    build, kw = CASES[case]
    base, x = build(), _inputs(case)
    src = _peftkit_model(copy.deepcopy(base), kw)
    perturb(src.named_parameters(), scale=0.05)
    want = logits(src, *x)
    assert (want - logits(base, *x)).abs().max().item() > 1e-3
    src.save_pretrained(tmp_path)
    got = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (logits(got, *x) - want).abs().max().item() < TOL


@pytest.mark.parametrize("case", CASES)
def test_same_keys_shapes_and_parameter_counts(case, tmp_path):
    build, kw = CASES[case]
    base = build()
    theirs_model, ours_model = _peft_model(copy.deepcopy(base), kw), _peftkit_model(copy.deepcopy(base), kw)
    theirs_model.save_pretrained(tmp_path / "peft")
    ours_model.save_pretrained(tmp_path / "peftkit")
    theirs = {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    ours = {k: tuple(v.shape) for k, v in load_file(tmp_path / "peftkit" / "adapter_model.safetensors").items()}
    assert ours == theirs and all(k.endswith(".ia3_l") for k in ours)
    assert ours_model.get_nb_trainable_parameters() == theirs_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", CASES)
def test_merged_weights_match_peft(case):
    build, kw = CASES[case]
    base = build()
    theirs = _peft_model(copy.deepcopy(base), kw)
    ours = _peftkit_model(copy.deepcopy(base), kw)
    with torch.no_grad():  # copy peft's random vectors into peftkit's, layer by layer
        values = {n.removeprefix("base_model.model.").replace(".ia3_l.default", ""): p
                  for n, p in theirs.named_parameters() if "ia3_l" in n}
        for path, host in hosts(ours).items():
            host.adapters["default"].ia3_l.copy_(values[path])
    want = theirs.merge_and_unload().state_dict()
    got = ours.merge_and_unload().state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
