"""Presets name modules that really exist in tiny transformers models of each architecture."""

from __future__ import annotations

import pytest

from peftkit.models.presets import (
    OUTPUT_HEADS,
    TARGET_MODULES,
    UnknownModelTypeError,
    default_target_modules,
    is_output_head,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
_DECODER = dict(_TINY, num_key_value_heads=2, head_dim=8)
_ENC_DEC = dict(vocab_size=128, d_model=32, max_position_embeddings=64)
_HEADS = ("AutoModelForSequenceClassification", "AutoModelForQuestionAnswering")


def _configs(model_type: str) -> list:
    """Tiny configs (hidden 32, 1 layer per stack); several where a preset covers architecture variants."""
    t = transformers
    tiny = {
        "llama": lambda: [t.LlamaConfig(**_DECODER)],
        "mistral": lambda: [t.MistralConfig(**_DECODER)],
        "qwen2": lambda: [t.Qwen2Config(**_DECODER)],
        "gemma": lambda: [t.GemmaConfig(**_DECODER)],
        "gpt2": lambda: [
            t.GPT2Config(
                n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=128, bos_token_id=0, eos_token_id=0
            )
        ],
        "gpt_neox": lambda: [t.GPTNeoXConfig(**_TINY)],
        "opt": lambda: [
            t.OPTConfig(**dict(_TINY, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64))
        ],
        "bert": lambda: [t.BertConfig(**_TINY)],
        "roberta": lambda: [t.RobertaConfig(**_TINY)],
        "t5": lambda: [
            t.T5Config(**_ENC_DEC, d_ff=64, d_kv=8, num_layers=1, num_heads=4, feed_forward_proj=ff)
            for ff in ("relu", "gated-gelu")
        ],
        "bart": lambda: [
            t.BartConfig(
                **_ENC_DEC,
                encoder_layers=1,
                decoder_layers=1,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
            )
        ],
    }
    return tiny[model_type]()


def _lm(config):
    """The model's usual language-modelling class, built with random weights."""
    auto = {
        "bert": "AutoModelForMaskedLM",
        "roberta": "AutoModelForMaskedLM",
        "t5": "AutoModelForSeq2SeqLM",
        "bart": "AutoModelForSeq2SeqLM",
    }
    torch.manual_seed(0)
    return getattr(transformers, auto.get(config.model_type, "AutoModelForCausalLM")).from_config(config)


def _linear_paths(model) -> list[str]:
    """Paths of every layer a LoRA-like method can adapt (nn.Linear and transformers' Conv1D)."""
    kinds = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


@pytest.mark.parametrize("model_type", sorted(TARGET_MODULES))
def test_every_preset_name_is_a_linear_layer_of_the_model(model_type):
    paths: list[str] = []
    for config in _configs(model_type):
        assert config.model_type == model_type
        paths += _linear_paths(_lm(config))
    for name in default_target_modules(model_type):
        assert any(_matches(p, name) for p in paths), f"{model_type}: no linear layer named {name!r}"


@pytest.mark.parametrize("model_type", sorted(TARGET_MODULES))
def test_presets_cover_the_blocks_and_skip_the_output_head(model_type):
    for config in _configs(model_type):
        model = _lm(config)
        head = next(p for p, m in model.named_modules() if m is model.get_output_embeddings())
        assert is_output_head(head), f"{model_type}: output head {head!r} is not in OUTPUT_HEADS"
        targeted = [
            p for p in _linear_paths(model) if any(_matches(p, n) for n in TARGET_MODULES[model_type])
        ]
        assert not any(is_output_head(p) for p in targeted), f"{model_type}: a preset name matches a head"
        untargeted = [p for p in _linear_paths(model) if p not in targeted and not is_output_head(p)]
        in_blocks = [p for p in untargeted if any(s in p for s in (".layers.", ".layer.", ".h.", ".block."))]
        assert not in_blocks, f"{model_type}: block projections the preset misses: {in_blocks}"


@pytest.mark.parametrize("model_type", sorted(TARGET_MODULES))
@pytest.mark.parametrize("auto_class", _HEADS)
def test_task_head_final_projection_is_an_output_head(model_type, auto_class):
    config = _configs(model_type)[0]
    try:
        model = getattr(transformers, auto_class).from_config(config)
    except ValueError:
        pytest.skip(f"transformers has no {auto_class} for {model_type}")
    last_linear = _linear_paths(model)[-1]
    assert is_output_head(last_linear), f"{model_type} {auto_class}: {last_linear!r} not in OUTPUT_HEADS"


def test_unknown_model_type_is_a_key_error_that_lists_known_types():
    with pytest.raises(KeyError) as info:
        default_target_modules("no-such-arch")
    assert isinstance(info.value, UnknownModelTypeError)
    message = str(info.value)
    assert "no-such-arch" in message
    assert all(model_type in message for model_type in TARGET_MODULES)


def test_is_output_head_matches_whole_path_components_only():
    assert is_output_head("lm_head") and is_output_head("roberta.lm_head.decoder")
    assert is_output_head("classifier.out_proj")
    assert not is_output_head("model.layers.0.self_attn.q_proj")
    assert not is_output_head("xlm_head") and not is_output_head("lm_head.dense")
    assert len(set(OUTPUT_HEADS)) == len(OUTPUT_HEADS)


def test_presets_are_immutable_tuples_of_unique_names():
    for model_type, names in TARGET_MODULES.items():
        assert isinstance(names, tuple) and names, model_type
        assert len(set(names)) == len(names), model_type
