"""Method tests use tiny tensors: one intra-op thread is faster and avoids OpenMP spin under CPU contention."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
