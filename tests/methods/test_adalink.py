"""AdaLink (spec 1.25): e' = e + B A e against a direct twin (embedding lookup first, then the module), the GELU
form, identity at init, the embedding-table fold E' = E + E A^T B^T giving identical logits, gradients only into
A and B, one module per targeted layer (modality), and config errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, MergeError
from peftkit.core.registry import config_for_peft_type
from peftkit.methods.adalink import AdaLinkConfig

from ._helpers import close, hosts, logits, mixed, mixed_inputs, perturb, tiny_llama, token_ids


def _model(base: nn.Module, name: str = "a", **kw) -> AdapterModel:
    model = AdapterModel(base)
    model.add_adapter(name, AdaLinkConfig(**kw))
    return model


@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_embedding_matches_the_twin(gelu):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 12, padding_idx=0)
    model = _model(nn.Sequential(copy.deepcopy(emb)), target_modules=["0"], r=3, use_gelu=gelu, init_weights=False)
    ad = hosts(model)["0"].adapters["a"]
    a, b = ad.adalink_A.detach(), ad.adalink_B.detach()
    assert a.shape == (3, 12) and b.shape == (12, 3)
    ids = torch.randint(0, 20, (4, 7))
    e = emb(ids)  # (4, 7, 12)
    h = e @ a.T  # (4, 7, 3): A e
    want = e + (F.gelu(h) if gelu else h) @ b.T
    assert close(model(ids), want)


def test_linear_and_conv_layers_act_on_w_x_before_the_bias():
    """On a projection (an image connector's last layer): y = W x + B A (W x) + b."""
    torch.manual_seed(0)
    for layer, x in ((nn.Linear(6, 5), torch.randn(3, 6)), (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5))):
        model = _model(nn.Sequential(copy.deepcopy(layer)), target_modules=["0"], r=2, init_weights=False)
        ad = hosts(model)["0"].adapters["a"]
        a, b = ad.adalink_A.detach(), ad.ops.flat(ad.adalink_B.detach())  # (2, out), (out, 2)
        bias = layer.bias.detach()
        e = layer(x) - ad.ops.channel(bias)  # W x
        lift = e.movedim(1, -1) if e.dim() == 4 else e  # channels last
        want = lift + lift @ a.T @ b.T
        want = (want.movedim(-1, 1) if e.dim() == 4 else want) + ad.ops.channel(bias)
        assert close(model(x), want)


@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_identity_at_init_and_init_values(gelu):
    base, x = tiny_llama(), token_ids()
    model = _model(copy.deepcopy(base), target_modules=["embed_tokens"], r=4, use_gelu=gelu)
    assert torch.equal(logits(model, x), logits(base, x))
    ad = hosts(model)["model.embed_tokens"].adapters["a"]
    assert torch.equal(ad.adalink_B, torch.zeros_like(ad.adalink_B))
    assert 0 < ad.adalink_A.abs().max().item() <= ad.adalink_A.shape[1] ** -0.5  # kaiming-uniform, fan_in d


def test_folded_embedding_table_gives_identical_logits():
    base, x = tiny_llama(), token_ids()
    model = _model(copy.deepcopy(base), target_modules=["embed_tokens"], r=4, init_weights=False)
    ad = hosts(model)["model.embed_tokens"].adapters["a"]
    want = logits(model, x)
    table = base.model.embed_tokens.weight.detach()  # (num, d)
    folded = table + table @ ad.adalink_A.detach().T @ ad.adalink_B.detach().T  # E' = E + E A^T B^T
    assert close(ad.delta_weight(), (folded - table).T)  # weight2d of an embedding is E^T
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        by_hand.model.embed_tokens.weight.copy_(folded)
    assert close(logits(by_hand, x), want)
    plain = model.merge_and_unload()
    assert close(plain.model.embed_tokens.weight, folded)
    assert close(logits(plain, x), want)


def test_lowered_form_and_unmerge():
    base, x = tiny_llama(), token_ids()
    model = _model(copy.deepcopy(base), target_modules=["embed_tokens", "o_proj"], r=3, init_weights=False)
    for path, host in hosts(model).items():
        ad = host.adapters["a"]
        inp = x if ad.ops.kind == "embedding" else torch.randn(2, 5, ad.ops.in_features)
        low = ad.lowered()
        assert low.rank == 3 and low.plain
        assert close(low.contribution(ad.ops, inp, None), ad(inp, None)), path
    want = logits(model, x)
    model.merge()
    assert close(logits(model, x), want)
    model.unmerge()
    model.set_active()
    assert close(logits(model, x), logits(base, x))


def test_gradients_reach_only_a_and_b():
    base, x = tiny_llama(), token_ids()
    model = _model(copy.deepcopy(base), target_modules=["embed_tokens"], r=4)
    perturb(model.named_parameters())
    model(x, labels=x).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"model.model.embed_tokens.adapters.a.adalink_A", "model.model.embed_tokens.adapters.a.adalink_B"}


def test_one_module_per_modality_and_per_task():
    """Each targeted layer (text embedding, image projection) gets its own A and B; tasks are separate adapters."""
    base, inputs = mixed(), mixed_inputs()
    model = _model(copy.deepcopy(base), target_modules=["emb", "conv"], r=2, init_weights=False)
    model.add_adapter("task2", AdaLinkConfig(target_modules=["emb"], r=5, init_weights=False))
    assert {p: sorted(h.adapters) for p, h in hosts(model).items()} == {"emb": ["a", "task2"], "conv": ["a"]}
    assert hosts(model)["emb"].adapters["a"].adalink_A.shape == (2, 12)
    assert hosts(model)["conv"].adapters["a"].adalink_A.shape == (2, 8)
    outs = []
    for name in ("a", "task2"):
        model.set_active(name)
        outs.append(logits(model, *inputs))
    assert (outs[0] - outs[1]).abs().max().item() > 1e-4


def test_gelu_form_is_not_mergeable():
    model = _model(nn.Sequential(nn.Embedding(10, 4)), target_modules=["0"], r=2, use_gelu=True)
    ad = hosts(model)["0"].adapters["a"]
    assert ad.method_name == "adalink_gelu" and ad.lowered() is None
    with pytest.raises(MergeError):
        model.merge()
    assert peftkit.get_method("adalink_gelu").make_config(target_modules=["e"]).use_gelu is True


@pytest.mark.parametrize("kw,field", [(dict(r=0), "r"), (dict(r=2.0), "r"), (dict(use_gelu="yes"), "use_gelu"),
                                      (dict(init_weights=1), "init_weights")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError) as info:
        AdaLinkConfig(target_modules=["embed_tokens"], **kw)
    assert info.value.field == field


def test_target_modules_are_required_and_registry():
    with pytest.raises(ConfigError, match="embed_tokens") as info:
        AdaLinkConfig()
    assert info.value.field == "target_modules"
    assert config_for_peft_type("ADALINK") is AdaLinkConfig
    assert AdaLinkConfig(target_modules=["e"]).method == "adalink"
