"""Atomic directory replacement: at every instant the target path holds one complete directory."""

from __future__ import annotations

import sys

import pytest

from grafting.io import atomic


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_replacing_a_directory_is_one_exchange(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic.atomic_dir(target) as d:
        (d / "weights").write_text("v1")
        (d / "kept").write_text("kept")

    def no_plain_rename(src, dst):  # the two-rename fallback would leave a moment with no `target`
        raise AssertionError(f"rename({src}, {dst}) used instead of an atomic exchange")

    monkeypatch.setattr(atomic.os, "rename", no_plain_rename)
    with atomic.atomic_dir(target) as d:
        (d / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert (target / "kept").read_text() == "kept"  # files the block did not write are carried over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the old copy is gone


def test_fallback_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # e.g. a filesystem without RENAME_EXCHANGE
    target = tmp_path / "adapter"
    for version in ("v1", "v2"):
        with atomic.atomic_dir(target) as d:
            (d / "weights").write_text(version)
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
