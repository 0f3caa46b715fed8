"""AdaLoRA (spec 1.32): forward/merge closed form, identity at init, the cubic budget, masking, the orthogonality
loss, training step-for-step against real `peft` (same masks, same logits), and pruned checkpoints in both
directions (peft prunes -> peftkit loads; peftkit prunes -> peft loads) plus peftkit's own save -> load."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import AdapterModel, ConfigError, UnsupportedLayerError, load_adapter, save_adapter
from peftkit.methods.adalora import AdaLoraAdapter, AdaLoraConfig
from peftkit.methods.rank_budget import cubic_budget, prune_mask

from ._helpers import close, hosts, logits, perturb, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=4, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _net_model(**cfg) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(Net().eval())
    model.add_adapter("default", AdaLoraConfig(**{"target_modules": ["fc1", "fc2"], "total_step": 10, **cfg}))
    return model


def _adapters(model: AdapterModel) -> list[AdaLoraAdapter]:
    return [h.adapters["default"] for h in hosts(model).values()]


def _train(model: AdapterModel, steps: int, peft_model=None, start: int = 1) -> None:
    """AdamW steps on a tiny LM task; peftkit adds the orthogonality loss and calls step_hook, peft (if given)
    runs the same steps with its own loss (the regularizer is added by AdaLoraModel.forward) and allocator."""
    kopt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    popt = peft_model and torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(start, start + steps):
        ids = token_ids(seed=step)
        (model(input_ids=ids, labels=ids).loss + sum(model.extra_losses().values())).backward()
        kopt.step()
        model.step_hook(step, kopt)
        kopt.zero_grad()
        if peft_model is not None:
            peft_model(input_ids=ids, labels=ids).loss.backward()
            popt.step()
            peft_model.base_model.update_and_allocate(step)
            popt.zero_grad()


def test_forward_and_merge_closed_form() -> None:
    model = _net_model(init_r=3, target_r=1, lora_alpha=6)
    x = torch.randn(5, 12)
    with model.disabled():
        base = logits(model, x)
    assert torch.equal(logits(model, x), base)  # E = 0: identity at init
    perturb(model.named_parameters(), seed=3)
    a, b = _adapters(model)
    s = 6 / (3 + 1e-5)  # peft: alpha / (ranknum + 1e-5), ranknum = init_r
    with torch.no_grad():
        h = torch.tanh(model.model.fc1.base_layer(x) + s * (x @ (a.lora_A * a.lora_E).T) @ a.lora_B.T)  # (5, 16)
        expected = model.model.fc2.base_layer(h) + s * (h @ (b.lora_A * b.lora_E).T) @ b.lora_B.T  # (5, 6)
        assert close(a.delta_weight(), s * a.lora_B @ torch.diag(a.lora_E.view(-1)) @ a.lora_A)
    out = logits(model, x)
    assert close(out, expected)
    model.merge()
    assert close(logits(model, x), out)


def test_cubic_budget_schedule() -> None:
    total, tinit, tfinal = 50, 5, 10
    budgets = [cubic_budget(t, 48, 16, tinit, tfinal, total)[0] for t in range(total + 1)]
    assert budgets[:tinit + 1] == [48] * (tinit + 1)
    assert all(b1 >= b2 for b1, b2 in zip(budgets, budgets[1:], strict=False))
    assert budgets[total - tfinal] == 16 and budgets[-1] == 16
    t = 20  # b(t) = b_T + (b_0 - b_T)(1 - (t - t_i)/(T - t_i - t_f))^3, floored
    assert budgets[t] == int(16 + 32 * (1 - (t - tinit) / (total - tfinal - tinit)) ** 3)
    assert [cubic_budget(t, 48, 16, 0, 0, 10, every=3)[1] for t in range(1, 10)] == [t % 3 == 0 for t in range(1, 10)]


def test_prune_mask_global_threshold() -> None:
    keeps = prune_mask([torch.tensor([0.5, 0.1, 0.9]), torch.tensor([0.2, 0.7])], n_prune=2)
    assert [k.tolist() for k in keeps] == [[True, False, True], [False, True]]
    assert all(k.all() for k in prune_mask([torch.rand(3)], 0))


def test_budget_reached_and_masked_triplets_stay_zero() -> None:
    torch.manual_seed(0)
    model = AdapterModel(tiny_llama())
    model.add_adapter("default", AdaLoraConfig(target_modules=TARGETS, **SCHEDULE))
    _train(model, 9)  # past T - t_f = 9: the final allocation
    layers = _adapters(model)
    kept = sum(int(a.keep.sum()) for a in layers)
    assert kept == 2 * len(layers)  # b_T = target_r * #modules (no ties with random scores)
    masks = [a.keep.clone() for a in layers]
    _train(model, 3, start=10)  # final phase: the mask is fixed and re-applied after every step
    for a, mask in zip(layers, masks, strict=True):
        assert torch.equal(a.keep, mask)
        assert not a.lora_E[~mask].any()
        assert a.lora_E[mask].all()  # kept triplets train on


def test_orthogonality_loss_matches_peft_formula() -> None:
    model = _net_model(orth_reg_weight=0.3)
    perturb(model.named_parameters(), seed=1)
    layers = _adapters(model)
    terms = [torch.linalg.matrix_norm(a.lora_A @ a.lora_A.T - torch.eye(12)) for a in layers]
    terms += [torch.linalg.matrix_norm(a.lora_B.T @ a.lora_B - torch.eye(12)) for a in layers]
    expected = 0.3 * sum(terms) / len(terms)
    assert close(model.extra_losses()["orth_reg"], expected)


def test_save_load_after_pruning_reproduces_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_llama()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", AdaLoraConfig(target_modules=TARGETS, **SCHEDULE))
    _train(model, 9)
    ids = token_ids(seed=50)
    out = logits(model, ids)
    save_adapter(model, tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for a, path in zip(_adapters(model), hosts(model), strict=True):
        assert pattern[f"{path}.lora_E"] == a.layer_fields()["rank_pattern"]
        assert tensors[f"base_model.model.{path}.lora_A"].shape[0] == int(a.keep.sum())
    loaded = AdapterModel(copy.deepcopy(base))
    load_adapter(loaded, tmp_path)
    assert close(logits(loaded, ids), out)
    assert [a.lora_E.shape[0] for a in _adapters(loaded)] == [int(a.keep.sum()) for a in _adapters(model)]
    save_adapter(loaded, tmp_path / "again")  # a loaded pruned adapter keeps its pattern
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == pattern


def test_train_state_carries_importance_and_recorded_masks() -> None:
    """What the resume contract's state_dict comparison cannot see: train_state moves each layer's importance EMAs
    (and their absence once the final allocation reset them) and `recorded` (whether save reports a rank pattern)."""
    models = []
    for steps in (0, 4, 10):  # SCHEDULE: allocations from step 4, importance reset at T - t_f = 9
        torch.manual_seed(0)
        models.append(AdapterModel(tiny_llama()))
        models[-1].add_adapter("default", AdaLoraConfig(target_modules=TARGETS, **SCHEDULE))
        _train(models[-1], steps)
    fresh, mid, done = (_adapters(m) for m in models)
    for a, b, c in zip(fresh, mid, done, strict=True):
        assert b.importance.has("lora_E") and not c.importance.has("lora_E") and b.recorded and not a.recorded
        mid_state = b.train_state()
        a.load_train_state(mid_state)  # a fresh layer takes the EMAs, the mask and `recorded`
        for name in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(a.importance.sens[name], b.importance.sens[name])
            assert torch.equal(a.importance.unc[name], b.importance.unc[name])
        assert a.layer_fields() == b.layer_fields() is not None
        b.load_train_state(c.train_state())  # and a tracking layer drops its EMAs for a state without them
        assert not b.importance.has("lora_E") and b.layer_fields() == c.layer_fields()


def test_training_matches_peft_and_pruned_checkpoints_cross_load(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_llama()
    cfg = dict(target_modules=TARGETS, lora_alpha=8, task_type="CAUSAL_LM", **SCHEDULE)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**cfg))
    pm.save_pretrained(tmp_path / "init")
    km = AdapterModel(copy.deepcopy(base))
    load_adapter(km, tmp_path / "init", trainable=True)  # same starting factors
    _train(km, 11, peft_model=pm)
    ids = token_ids(seed=50)
    out_p, out_k = logits(pm, ids), logits(km, ids)
    assert close(out_k, out_p)
    pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    ours = {f"{p}.lora_E": a.layer_fields()["rank_pattern"] for p, a in zip(hosts(km), _adapters(km), strict=True)}
    assert ours == pattern
    assert any(not all(v) for v in pattern.values())
    pm.save_pretrained(tmp_path / "peft")
    save_adapter(km, tmp_path / "kit")
    kt, pt = load_file(tmp_path / "kit" / "adapter_model.safetensors"), load_file(tmp_path / "peft" /
                                                                                  "adapter_model.safetensors")
    assert {k: v.shape for k, v in kt.items()} == {k: v.shape for k, v in pt.items()}
    k2 = AdapterModel(copy.deepcopy(base))
    load_adapter(k2, tmp_path / "peft")  # peft prunes -> peftkit loads
    assert close(logits(k2, ids), out_p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # peft's own note on rank_pattern keys when loading
        p2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "kit")  # peftkit prunes -> peft loads
    assert close(logits(p2, ids), out_k)


def test_config_errors_name_the_field() -> None:
    bad = [({"total_step": None}, "total_step"), ({"total_step": 10, "tinit": 8, "tfinal": 2}, "tinit"),
           ({"total_step": 10, "target_r": 13}, "target_r"), ({"total_step": 10, "beta1": 1.0}, "beta1"),
           ({"total_step": 10, "deltaT": 0}, "deltaT"), ({"total_step": 10, "orth_reg_weight": -1}, "orth_reg_weight"),
           ({"total_step": 10, "rank_pattern": {"fc1.lora_E": [True]}}, "rank_pattern['fc1.lora_E']"),
           ({"total_step": 10, "init_r": 0}, "init_r")]
    for fields, name in bad:
        with pytest.raises(ConfigError) as info:
            AdaLoraConfig(target_modules=["fc1"], **fields)
        assert info.value.field == name, fields


def test_unsupported_layers_raise() -> None:
    model = AdapterModel(nn.Sequential(nn.Embedding(10, 4)))
    with pytest.raises(UnsupportedLayerError):
        model.add_adapter("default", AdaLoraConfig(target_modules=["0"], total_step=10))
