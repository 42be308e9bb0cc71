"""Content hashes of adapters: SHA-256 of the config and the tensors exactly as ``save_adapter`` writes them.

Caches that must never serve stale state (the mixed-batch stacks, a serving pool) key on the hash. It is
recomputed only when one of the adapter's tensors changed: the version key is every tensor's (id, version) plus
a uid given to each adapter module at creation (ids alone may be reused once an adapter is freed).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def content_hashes(model, names) -> dict:
    """name -> SHA-256 of the adapter's config and on-disk tensors, recomputed only when a tensor changed."""
    keys = version_keys(model, names)
    out = {}
    for name in names:
        hit = model._hashes.get(name)
        if hit is None or hit[0] != keys[name]:
            from .io.peft_format import adapter_tensors
            h = hashlib.sha256(json.dumps(model.peft_config[name].to_peft_dict(), sort_keys=True,
                                          default=str).encode())
            for k, t in sorted(adapter_tensors(model, name).items()):
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            hit = model._hashes[name] = (keys[name], h.hexdigest())
        out[name] = hit[1]
    return out


def version_keys(model, names) -> dict:
    """Per adapter: uids and (id, version) of every tensor it owns, in one walk over the model."""
    modules: dict = {n: [] for n in names}
    for _, h in model.hosts():
        for n in names:
            a = h.adapters._modules.get(n)
            if a is not None:
                modules[n].append(a)
    for _, s in model.saved_modules():
        for n in names:
            if n in s.copies:
                modules[n].append(s.copies[n])
    for n in names:
        if n in model.shared_tensors:
            modules[n].append(model.shared_tensors[n])
    return {n: tuple(tensor_versions(m) for m in ms) for n, ms in modules.items()}


def tensor_versions(module: nn.Module) -> tuple:
    """The module's uid and (id, version) of every parameter and buffer below it."""
    out, todo = [module.__dict__.get("_graft_uid")], [module]
    while todo:  # a manual walk: named_parameters() is slow enough to show on every forward
        m = todo.pop()
        out.extend((id(t), t._version) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
        todo.extend(c for c in m._modules.values() if c is not None)
    return tuple(out)
