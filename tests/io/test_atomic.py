"""Atomic writes: at every instant the target path holds one complete directory, concurrent and killed
writers included; leftovers of dead writers are cleared; permissions follow the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest
import torch

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


def test_concurrent_writers_of_one_new_directory_both_succeed(tmp_path):
    """Two writers race to create the same new directory: neither fails and the winner's copy is whole."""
    rounds, names = 40, [f"part{k}" for k in range(4)]
    barrier = threading.Barrier(2)
    errors = []

    def writer(tag: str) -> None:
        for i in range(rounds):
            barrier.wait()  # both start the same round's first save together: the race is every round
            try:
                with atomic.atomic_dir(tmp_path / f"new{i}") as d:
                    for name in names:
                        (d / name).write_text(f"{tag}:{i}")
            except BaseException as e:  # noqa: BLE001 - any failure of either writer fails the test
                errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    for i in range(rounds):
        contents = {(tmp_path / f"new{i}" / name).read_text() for name in names}
        assert contents in ({f"a:{i}"}, {f"b:{i}"}), contents  # one writer's files, all of them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"new{i}" for i in range(rounds))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "adapter"
    dead = dead_pid()
    stale_dir = tmp_path / f".adapter.tmp-{dead}-abc123"
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"half")
    stale_old = tmp_path / f".adapter.old-{dead}-deadbeef"
    stale_old.mkdir()
    stale_file = tmp_path / f".summary.json.tmp-{dead}-xyz"
    stale_file.write_bytes(b"{")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = [tmp_path / f".adapter.tmp-{sleeper.pid}-live01", tmp_path / f".adapter.tmp-{os.getpid()}-live02"]
        for d in live:
            d.mkdir()
        other = tmp_path / f".other.tmp-{dead}-keep00"  # another target's: not this save's business
        other.mkdir()
        with atomic.atomic_dir(target) as d:
            (d / "weights").write_text("v1")
        atomic.atomic_write_bytes(tmp_path / "summary.json", b"{}")
        assert not stale_dir.exists() and not stale_old.exists() and not stale_file.exists()
        assert all(d.is_dir() for d in live) and other.is_dir()
        assert (target / "weights").read_text() == "v1"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_written_files_and_directories_follow_the_umask(tmp_path):
    import grafting as gf
    from torch import nn

    old = os.umask(0o027)
    try:
        with atomic.atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
        atomic.atomic_write_bytes(tmp_path / "file.json", b"{}")
        model = gf.adapt(nn.Sequential(nn.Linear(4, 4)), gf.LoraConfig(r=2, target_modules=["0"]))
        model.save_adapter(tmp_path / "adapter")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "d") == 0o750 and mode(tmp_path / "d" / "f") == 0o640
    assert mode(tmp_path / "file.json") == 0o640
    assert mode(tmp_path / "adapter") == 0o750
    assert {mode(p) for p in (tmp_path / "adapter").iterdir()} == {0o640}


# A writer that saves one adapter completely, then dies with os._exit at a chosen point of the second save.
KILLED_WRITER = """
import os, sys, tempfile
from pathlib import Path
import torch, grafting as gf
from torch import nn
from grafting.io import atomic

target, point = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = gf.adapt(nn.Sequential(nn.Linear(64, 64)), gf.LoraConfig(r=8, target_modules=["0"]))

def bump():
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

bump()
model.save_adapter(target)
model.save_adapter(target.parent / "first")
bump()
model.save_adapter(target.parent / "second")

def die(*args, **kwargs):
    os._exit(9)

def after(real):
    def wrapped(*args, **kwargs):
        real(*args, **kwargs)
        os._exit(9)
    return wrapped

if point == "temp-created":  # the temporary directory exists, nothing is in it
    tempfile.mkdtemp = after(tempfile.mkdtemp)
elif point == "weights-written":  # the weights are in the temporary directory, the config is not
    Path.write_text = die
elif point == "all-written":  # every file written, none synced yet
    os.fsync = die
elif point == "before-swap":
    atomic._exchange = die
elif point == "after-swap":  # the new adapter is in place, the previous one not yet removed
    atomic._exchange = after(atomic._exchange)
model.save_adapter(target)
print("the save was not interrupted")
"""
CRASH_POINTS = {"temp-created": "first", "weights-written": "first", "all-written": "first",
                "before-swap": "first", "after-swap": "second"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the swap under test is renameat2")
@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_killed_writer_never_leaves_a_partial_adapter(tmp_path, point):
    """A writer killed at each point of a save leaves one complete adapter; the next save clears its leftovers."""
    import grafting as gf
    from torch import nn

    from grafting.io import peft_format

    target = tmp_path / "big"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), point], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 9, proc.stdout + proc.stderr[-2000:]
    assert [p.name for p in tmp_path.glob(".big.tmp-*")], "the crash landed inside the save"
    expected = tmp_path / CRASH_POINTS[point]
    ours, ref = peft_format.read_tensors(target), peft_format.read_tensors(expected)
    assert ours.keys() == ref.keys() and len(ref) == 2
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    assert (target / "adapter_config.json").read_bytes() == (expected / "adapter_config.json").read_bytes()

    model = gf.adapt(nn.Sequential(nn.Linear(64, 64)), gf.LoraConfig(r=8, target_modules=["0"]))
    model.save_adapter(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "first", "second"]
    assert peft_format.read_tensors(target).keys() == ref.keys()
