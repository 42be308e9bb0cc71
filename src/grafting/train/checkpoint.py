"""Training checkpoints: adapter + optimizer + schedule position + RNG + data position, written atomically.

Layout of ``<output_dir>/checkpoint/``: the adapter in PEFT's format, ``trainer_state.safetensors`` (optimizer
moments and RNG state as tensors) and ``trainer_state.json`` (step, history, optimizer hyper-parameters). No
pickle: the optimizer state is flattened to named tensors and rebuilt on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..errors import GraftingError
from ..io import peft_format
from ..io.atomic import atomic_dir

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: Path, model, adapter_name: str, optimizer, state: dict) -> None:
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**state, "optimizer": optim_meta, "adapter_name": adapter_name}
    with atomic_dir(path) as tmp:
        model.save_adapter(tmp / "adapter", name=adapter_name, export=False)
        (tmp / STATE_TENSORS).write_bytes(save(tensors))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))


def load_checkpoint(path: Path, model, adapter_name: str, optimizer) -> dict:
    """Restore adapter weights, optimizer and RNG in place; returns the saved trainer state."""
    path = Path(path)
    if not (path / STATE_JSON).is_file():
        raise GraftingError(f"{path}: no checkpoint to resume from ({STATE_JSON} missing)")
    try:
        meta = json.loads((path / STATE_JSON).read_text())
    except json.JSONDecodeError as e:
        raise GraftingError(f"{path / STATE_JSON}: not valid JSON ({e})") from None
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as e:  # safetensors raises several types for damaged files
        raise GraftingError(f"{path / STATE_TENSORS}: not a readable safetensors file ({e})") from None
    peft_format.fill_adapter(model, path / "adapter", adapter_name)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (ValueError, KeyError) as e:
        raise GraftingError(f"{path}: optimizer state does not fit this recipe's trainable parameters ({e})") from None
    torch.set_rng_state(tensors["rng.torch"])
    return meta
