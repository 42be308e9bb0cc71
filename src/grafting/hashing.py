"""Content hashes of adapters: SHA-256 of the config and the tensors exactly as ``save_adapter`` writes them.

Caches that must never serve stale state (the mixed-batch stacks, a serving pool) key on the hash. It is
recomputed only when one of the adapter's tensors changed: the version key is every tensor's (id, version) plus
a uid given to each adapter module at creation (ids alone may be reused once an adapter is freed).
"""

from __future__ import annotations

import hashlib
import json

import torch


def content_hashes(model, names) -> dict:
    """name -> SHA-256 of the adapter's config and on-disk tensors, recomputed only when a tensor changed."""
    keys = version_keys(model, names)
    out = {}
    for name in names:
        hit = model._hashes.get(name)
        if hit is None or hit[0] != keys[name]:
            from .io.peft_format import adapter_tensors
            digest = adapter_hash(model.peft_config[name], adapter_tensors(model, name))
            hit = model._hashes[name] = (keys[name], digest)
        out[name] = hit[1]
    return out


def adapter_hash(config, tensors: dict) -> str:
    """SHA-256 of an adapter config and its tensors (key, dtype, shape and bytes, in key order)."""
    h = hashlib.sha256(json.dumps(config.to_peft_dict(), sort_keys=True, default=str).encode())
    for k, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def version_keys(model, names) -> dict:
    """Per adapter: uids and (id, version, storage) of every tensor it owns. Runs on every mixed forward, so the
    modules owning each adapter's tensors are listed once per change of the model's adapters, not per call."""
    owners = model.__dict__.setdefault("_owners", {})
    out = {}
    for n in names:
        hit = owners.get(n)
        if hit is None or hit[0] != model._structure:
            hit = owners[n] = (model._structure, _owning_modules(model, n))
        mods = hit[1]
        out[n] = (tuple([m.__dict__.get("_graft_uid") for m in mods]),
                  tuple([(id(t), t._version, t.data_ptr()) for m in mods
                         for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]))
    return out


def _owning_modules(model, name) -> list:
    roots = [h.adapters[name] for _, h in model.hosts() if name in h.adapters]
    roots += [s.copies[name] for _, s in model.saved_modules() if name in s.copies]
    if name in model.shared_tensors:
        roots.append(model.shared_tensors[name])
    return [m for root in roots for m in root.modules() if m._parameters or m._buffers or m is root]
