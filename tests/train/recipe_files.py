"""Writing training recipes for tests (a module of its own: test files import it by name, which a conftest
shared by several test directories cannot offer)."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_recipe(path: Path, model_dir: Path, train: Path, val: Path, out: Path, **train_fields) -> Path:
    recipe = {
        "model": {"path": str(model_dir), "task": "seq_cls"},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"source": "files", "train": str(train), "validation": str(val), "max_length": 32},
        "optim": {"lr": 5e-3},
        "schedule": {"name": "linear", "warmup_steps": 2},
        "train": {"batch_size": 8, "max_steps": 12, "progress": False, "seed": 3, **train_fields},
        "output_dir": str(out),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path
