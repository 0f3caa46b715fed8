"""Bad input gets a named error that says what to change, and a failed call leaves the model as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit import AdapterModel, LoraConfig
from peftkit.errors import (
    AdapterNameError,
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    NonFiniteWeightError,
    NoTargetMatchedError,
    ShapeMismatchError,
    UnknownMethodError,
    UnsupportedLayerError,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.proj(self.emb(x))))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True), k


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("field,kwargs", [
    ("r", {"r": 0}), ("r", {"r": 2.5}), ("r", {"r": 10**6}), ("lora_alpha", {"lora_alpha": -1}),
    ("lora_alpha", {"lora_alpha": float("nan")}), ("lora_dropout", {"lora_dropout": 1.0}),
    ("init_lora_weights", {"init_lora_weights": "pisa"}), ("bias", {"bias": "some"}),
    ("rank_pattern['q']", {"rank_pattern": {"q": 0}}), ("target_modules", {"target_modules": []}),
    ("lora_bias", {"lora_bias": True, "use_dora": True}), ("layers_to_transform", {"layers_to_transform": ["0"]}),
])
def test_invalid_config_names_the_field(field, kwargs):
    kwargs.setdefault("target_modules", ["proj"])
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert info.value.field == field
    assert field.split("[")[0] in str(info.value)


def test_unknown_config_field_lists_valid_fields():
    with pytest.raises(ConfigError, match="valid fields") as info:
        LoraConfig.from_dict({"r": 4, "rank": 4})
    assert info.value.field == "rank"


def test_unknown_method_lists_registered_methods():
    with pytest.raises(UnknownMethodError, match="registered methods: .*lora"):
        peftkit.get_method("loar")


def test_no_match_lists_existing_module_names_and_changes_nothing(net):
    before = snapshot(net)
    model = AdapterModel(net)
    with pytest.raises(NoTargetMatchedError, match="proj"):
        model.add_adapter("default", LoraConfig(target_modules=["q_proj"]))
    assert_unchanged(net, before)
    assert model.configs == {} and not list(model.hosts())


def test_unsupported_layer_type_changes_nothing(net):
    before = snapshot(net)
    model = AdapterModel(net)
    with pytest.raises(UnsupportedLayerError, match="LayerNorm.*exclude_modules"):
        model.add_adapter("default", LoraConfig(target_modules=["proj", "norm"]))
    assert_unchanged(net, before)
    assert not list(model.hosts())  # proj was not wrapped either: the plan failed before any commit


def test_rank_above_what_svd_init_can_take(net):
    model = AdapterModel(net)
    with pytest.raises(ConfigError, match="min\\(out, in\\)") as info:
        model.add_adapter("default", LoraConfig(target_modules=["head"], r=4, init_lora_weights="pissa"))
    assert info.value.field == "r"


@pytest.mark.parametrize("bad", ["a.b", "x/y", "", "__base__", "../up"])
def test_invalid_adapter_names(net, bad):
    with pytest.raises(AdapterNameError):
        AdapterModel(net).add_adapter(bad, LoraConfig(target_modules=["proj"]))


def test_adapter_name_collision_and_unknown(net):
    model = AdapterModel(net)
    model.add_adapter("a", LoraConfig(target_modules=["proj"]))
    with pytest.raises(AdapterNameError, match="already exists"):
        model.add_adapter("a", LoraConfig(target_modules=["head"]))
    with pytest.raises(AdapterNameError, match="unknown adapter 'b'"):
        model.set_active("b")
    with pytest.raises(AdapterNameError):
        model.delete_adapter("b")
    with pytest.raises(AdapterNameError):
        with model.routed(["a", "b"]):
            pass


def test_mixed_batch_length_must_match(net):
    model = AdapterModel(net)
    model.add_adapter("a", LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="one per row"), model.routed(["a"]):
        model(torch.zeros(2, 3, dtype=torch.long))


def test_safe_merge_refuses_nan_and_leaves_weights(net):
    model = AdapterModel(net)
    model.add_adapter("a", LoraConfig(target_modules=["proj", "head"], init_lora_weights=False))
    with torch.no_grad():
        model.model.head.adapters["a"].lora_B.fill_(float("nan"))
    before = snapshot(model)
    with pytest.raises(NonFiniteWeightError, match="head"):
        model.merge(safe=True)
    assert_unchanged(model, before)
    assert all(not h.merged for _, h in model.hosts())


# --- checkpoints --------------------------------------------------------------------------------------------
@pytest.fixture
def saved(net, tmp_path):
    model = peftkit.get_peft_model(copy.deepcopy(net), LoraConfig(target_modules=["proj", "emb"], r=2))
    model.save_pretrained(tmp_path)
    return tmp_path


def _load_fails(net, path, error, match):
    before = snapshot(net)
    model = peftkit.PeftModel(net)
    with pytest.raises(error, match=match):
        model.load_adapter(path, "default")
    assert_unchanged(net, before)
    assert not list(model.hosts()) and not model.configs


def test_truncated_weights_file(net, saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _load_fails(net, saved, CorruptCheckpointError, "corrupt or truncated")


def test_garbage_weights_file(net, saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    _load_fails(net, saved, CorruptCheckpointError, "safetensors")


def test_corrupt_config_json(net, saved):
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    _load_fails(net, saved, CorruptCheckpointError, "invalid JSON")


def test_unknown_peft_type(net, saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "NOPE"}))
    _load_fails(net, saved, UnknownMethodError, "unsupported peft_type 'NOPE'")


def test_shape_mismatch_names_the_key(net, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    key = "base_model.model.proj.lora_A.weight"
    tensors[key] = torch.zeros(3, 8)
    save_file(tensors, saved / "adapter_model.safetensors")
    _load_fails(net, saved, ShapeMismatchError, r"proj\.lora_A\.weight has shape \(3, 8\).*expects \(2, 8\)")


def test_nan_in_file(net, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, saved / "adapter_model.safetensors")
    _load_fails(net, saved, NonFiniteWeightError, "proj.lora_B.weight contains NaN")


def test_missing_and_unexpected_keys(net, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.model.proj.lora_B.weight"]
    save_file(tensors, saved / "adapter_model.safetensors")
    _load_fails(net, saved, CorruptCheckpointError, "missing 1 key")
    tensors["base_model.model.proj.lora_B.weight"] = torch.zeros(8, 2)
    tensors["base_model.model.nothere.lora_A.weight"] = torch.zeros(2, 8)
    save_file(tensors, saved / "adapter_model.safetensors")
    _load_fails(net, saved, CorruptCheckpointError, "nothere")


def test_integer_tensor_rejected(net, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.proj.lora_B.weight"] = torch.zeros(8, 2, dtype=torch.int64)
    save_file(tensors, saved / "adapter_model.safetensors")
    _load_fails(net, saved, CorruptCheckpointError, "dtype torch.int64")


def test_pickle_only_directory_is_refused(net, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["proj"]}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    _load_fails(net, tmp_path, CheckpointError, "pickle files are never loaded")


def test_save_refuses_pickle(net, tmp_path):
    model = peftkit.get_peft_model(net, LoraConfig(target_modules=["proj"]))
    with pytest.raises(CheckpointError, match="safetensors"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not list(tmp_path.iterdir())


def test_save_is_atomic_no_temp_files_left(net, tmp_path):
    model = peftkit.get_peft_model(net, LoraConfig(target_modules=["proj"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_unknown_config_keys_warn_when_they_matter(net, saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(cfg | {"some_future_option": 3, "inert_option": None}))
    with pytest.warns(UserWarning, match="some_future_option"):
        peftkit.PeftModel.from_pretrained(net, saved)
