"""inspect_adapter: factor-side statistics equal the ones of the explicit dW = s B A; effective rank; plot."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from peftkit.tools import format_table, inspect_adapter, spectrum_plot
from peftkit.tools.inspect import effective_rank, factor_stats

from .helpers import trained_adapter


def _explicit(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return s * (b.flatten(1).double() @ a.flatten(1).double())  # (out, in_flat)


def _assert_spectrum(sv: tuple[float, ...], dense: torch.Tensor) -> None:
    """The r reported values are the top of the dense spectrum; the dense rest is zero up to rounding."""
    full = torch.linalg.svdvals(dense)
    r = len(sv)
    torch.testing.assert_close(torch.tensor(sv, dtype=torch.float64), full[:r], atol=1e-9, rtol=1e-9)
    assert float(torch.cat([full[r:], full.new_zeros(1)]).max()) < 1e-9 * float(full[0])


@pytest.mark.parametrize("out_f, in_f, r", [(40, 30, 5), (6, 30, 8), (40, 3, 8)], ids=["tall", "few_out", "few_in"])
def test_factor_stats_equal_explicit_svd(out_f, in_f, r):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    fro, sv = factor_stats(a, b, 0.7)
    dense = _explicit(a, b, 0.7)
    expected = torch.linalg.svdvals(dense)[:r]
    assert sv.shape == (r,)
    torch.testing.assert_close(sv[: expected.numel()], expected, atol=1e-10, rtol=1e-10)
    assert torch.all(sv[expected.numel():] == 0)
    assert fro == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-12)


def test_inspect_adapter_matches_saved_tensors(tmp_path):
    model, adapter_dir = trained_adapter(tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True,
                                         rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3})
    stats = inspect_adapter(adapter_dir)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(stats) == 6 and [s.name for s in stats] == sorted(s.name for s in stats)
    for s in stats:
        adapter = model.model.get_submodule(s.name).adapters["default"]
        a, b = (tensors[f"base_model.model.{s.name}.lora_{x}.weight"] for x in "AB")
        assert (s.r, s.scale) == (a.shape[0], pytest.approx(adapter.scaling))
        dense = _explicit(a, b, s.scale)
        _assert_spectrum(s.singular_values, dense)
        assert s.fro_norm == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)
        assert 1 <= s.effective_rank <= s.r and s.extras == ()
    table = format_table(stats)
    assert all(s.name in table for s in stats) and "eff.rank" in table


def test_effective_rank_of_rank_one_and_isotropic_deltas():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(20, 1, generator=g), torch.randn(1, 12, generator=g)
    a = torch.cat([v, torch.zeros(3, 12)])  # (4, 12): rank 1 with r = 4
    b = torch.cat([u, torch.randn(20, 3, generator=g)], dim=1)  # (20, 4)
    _, sv = factor_stats(a, b, 2.0)
    assert effective_rank(sv) == pytest.approx(1.0, abs=1e-9)
    r = 5
    q_out = torch.linalg.qr(torch.randn(20, r, generator=g))[0]  # (20, r) orthonormal columns
    q_in = torch.linalg.qr(torch.randn(12, r, generator=g))[0]  # (12, r)
    _, sv = factor_stats(q_in.T, q_out * 3.0, 0.5)  # dW = 1.5 Q_out Q_in^T: r equal singular values
    assert effective_rank(sv) == pytest.approx(r, rel=1e-9)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(0.75 * math.log(0.75)
                                                                                + 0.25 * math.log(0.25))))


def test_extra_per_module_tensors_are_listed(tmp_path):
    _, adapter_dir = trained_adapter(tmp_path / "adapter", r=2, use_dora=True)
    stats = inspect_adapter(adapter_dir)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    for s in stats:
        (extra,) = s.extras
        m = tensors[f"base_model.model.{s.name}.{extra.name}"].double()
        assert extra.shape == tuple(m.shape) and extra.norm == pytest.approx(float(m.norm()))
        assert extra.rms_from_one == pytest.approx(float((m - 1).square().mean().sqrt()))
    assert extra.name in format_table(stats)


def test_embedding_factors_are_inspected(tmp_path):
    _, adapter_dir = trained_adapter(tmp_path / "adapter", r=3, target_modules=["embed_tokens"])
    (s,) = inspect_adapter(adapter_dir)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    a, b = (tensors[f"base_model.model.{s.name}.lora_embedding_{x}"] for x in "AB")
    _assert_spectrum(s.singular_values, _explicit(a, b, s.scale))


def test_spectrum_plot_writes_png(tmp_path):
    _, adapter_dir = trained_adapter(tmp_path / "adapter", r=4, rank_pattern={"v_proj": 2})
    stats = inspect_adapter(adapter_dir)
    zero = type(stats[0])("zero", 2, 1.0, 0.0, (0.0, 0.0), 0.0)  # an untrained layer (B = 0) is skipped
    spectrum_plot([*stats, zero], tmp_path / "spectrum.png")
    data = (tmp_path / "spectrum.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
