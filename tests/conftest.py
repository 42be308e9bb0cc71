"""Shared test fixtures. The helpers tests import by name live in toys.py: a module named ``conftest`` is
shadowed by tests/train/conftest.py when both directories run in one session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
