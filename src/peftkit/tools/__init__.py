"""Adapter tools: merge into a plain model directory, export for vLLM, inspect per-layer update statistics.

Importing this package is light: transformers and matplotlib are imported only by the functions that need them.
"""

from __future__ import annotations

from .export import ExportReport, export_vllm
from .inspect import LayerStats, TensorStats, format_table, inspect_adapter, spectrum_plot
from .merge import merge_to_dir

__all__ = ["ExportReport", "LayerStats", "TensorStats", "export_vllm", "format_table", "inspect_adapter",
           "merge_to_dir", "spectrum_plot"]
