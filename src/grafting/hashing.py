"""Content hashes of adapters: SHA-256 of the config and the tensors exactly as ``save_adapter`` writes them.

Caches that must never serve stale state (the mixed-batch stacks, a serving pool) key on the hash. It is
recomputed only when one of the adapter's tensors changed: the version key is every tensor's (id, version,
storage) plus a uid given to each adapter module at creation (ids alone may be reused once an adapter is freed).

The key is read on every mixed forward, so each adapter's modules and tensors are listed once and re-listed only
when one of its modules registers a parameter, buffer or submodule, or a container registers one under its name
(torch's global registration hooks count per adapter; deleting an adapter drops its listing): a per-call walk
of 64 adapters x 24 layers of module dicts cost about a millisecond per decode step. For the model's tree
(:class:`grafting.inject.AdaptedTree`) only registrations on modules it listed (:func:`watch`) count:
transformers' Llama-family models build a new ``ModuleList`` (``self.layers[:n]``) in every forward, and
counting its registrations re-listed every adapter and the whole model at every call.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import weakref

import torch
from torch.nn.modules import module as _module

_registrations = [0]  # bumped whenever a watched module registers a parameter, buffer or submodule
_watched: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_PROCESS = os.urandom(8)  # stamps listings: a model pickled in another process lists its adapters anew


_tags: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()  # see _listing


def _registered(module, name=None, *_args) -> None:
    if module in _watched:
        _registrations[0] += 1
    tag = _tags.get(module)
    if tag is not None:  # a module of one adapter, or a container keyed by adapter names (adapter None)
        changes, adapter = tag
        adapter = name if adapter is None else adapter
        changes[adapter] = changes.get(adapter, 0) + 1


def watch(modules) -> None:
    """Count registrations on ``modules`` from now on: a cache keyed on :func:`registrations` listed them."""
    _watched.update(modules)


_module.register_module_parameter_registration_hook(_registered)
_module.register_module_buffer_registration_hook(_registered)
_module.register_module_module_registration_hook(_registered)


def registrations() -> int:
    """How many parameters, buffers and submodules watched modules have registered so far (a cache key)."""
    return _registrations[0]


def content_hashes(model, names) -> dict:
    """name -> SHA-256 of the adapter's config and on-disk tensors, recomputed only when a tensor changed."""
    return call_state(model, names, trust_seals=False)[0]


# read for every tensor and module of every adapter of every mixed call: map() over C-level getters keeps
# the per-item work out of the interpreter (25 adapters of 18 layers, hot: 202 -> 180 us per call)
_VERSION, _TRAINING, _PTR = operator.attrgetter("_version"), operator.attrgetter("training"), torch.Tensor.data_ptr


def call_state(model, names, trust_seals: bool = True) -> tuple[dict, bool]:
    """(name -> content hash, whether any module of these adapters is in training mode), in one pass; the hashes
    of sealed adapters (:func:`seal`) as sealed, unless ``trust_seals`` is False."""
    out, training = {}, False
    sealed = model._routing.sealed if trust_seals else None
    for name in names:
        if sealed:
            hit = sealed.get(name)
            if hit is not None:
                if hit[0] == _seal_stamp(model, name):
                    out[name] = hit[1]
                    continue
                sealed.pop(name, None)  # it registered something: checked in full from now on (pop: threads)
        key, modules = _version_key(model, name)
        training = training or any(map(_TRAINING, modules))
        cached = model._hashes.get(name)
        if cached is None or cached[0] != key:
            from .io.peft_format import adapter_tensors
            cached = model._hashes[name] = (key, adapter_hash(model.peft_config[name], adapter_tensors(model, name, copy=False)))
        out[name] = cached[1]
    return out, training


def seal(model, names) -> list:
    """Check adapters ``names`` in full once, then let no-grad mixed calls trust their hashes: a sealed adapter
    costs a dict lookup per call instead of a read of every tensor's version and address and every module's mode
    (with 30 layers' worth of tensors, about 0.2 ms per adapter per call once a decode step has left them out of
    cache). A seal promises that the adapter changes only through the model's own methods or torch's Module
    methods on the model or a layer holding it: the seal lasts until the adapter registers a module, parameter
    or buffer, its weights are filled again (``fill_adapter``, a pool's refill, DyLoRA's ``set_eval_rank``),
    :func:`unseal`, or a layer holding it runs ``.train()``, ``.to()`` / ``.double()``, ``.apply(fn)``,
    ``load_state_dict`` or a forward with grad enabled (or ``on_step``). An in-place edit of a sealed adapter's
    tensor from outside those (``adapter.lora_B.add_(...)`` under no_grad, an optimizer stepping without a
    forward) is not seen by mixed calls; :meth:`content_hash` always checks in full. A serving pool seals what
    it installs: its parameters are the host tier's read tensors, which nothing may edit in any case. Adapters
    with a module in training mode are not sealed (their calls may differ, e.g. dropout). Returns the names
    sealed. Seal an adapter while no other thread edits it."""
    done = []
    for name in names:
        hashes, training = call_state(model, [name], trust_seals=False)
        if not training:
            model._routing.sealed[name] = (_seal_stamp(model, name), hashes[name])
            done.append(name)
    return done


def unseal(model, names=None) -> None:
    """Check adapters ``names`` (default: all) in full on every mixed call again (see :func:`seal`)."""
    sealed = model._routing.sealed
    for name in list(sealed) if names is None else names:
        sealed.pop(name, None)


def _seal_stamp(model, name) -> int:
    return model.__dict__.get("_adapter_changes", {}).get(name, 0)


def _version_key(model, name) -> tuple:
    """(version key, modules) of adapter ``name``: what its cached hash is valid for."""
    owners = model.__dict__.setdefault("_owners", {})
    changes = model.__dict__.setdefault("_adapter_changes", {})
    # id(model) and this process: a deepcopy or unpickled model carries the cache but not the tagged modules
    stamp = (changes.get(name, 0), id(model), _PROCESS)
    hit = owners.get(name)
    if hit is None or hit[0] != stamp:
        hit = owners[name] = (stamp, *_listing(model, name))
    _, fixed, tensors, modules = hit
    return (fixed, tuple(map(_VERSION, tensors)), tuple(map(_PTR, tensors))), modules


def adopt_hash(model, name: str, config, tensors: dict, digest: str, held: bool = False) -> bool:
    """Record ``digest`` = ``adapter_hash(config, tensors)``, computed elsewhere (a serving pool's loader thread
    hashes what it read), as adapter ``name``'s content hash if the model holds exactly that config and those
    tensors, so its first mixed call does not hash it again. Comparing is a few times cheaper than hashing;
    ``held``: the install said the adapter's tensors are ``tensors`` themselves (``install_adapter`` /
    ``refill_adapter`` returned True), so only the config is compared (listing and checking 240 tensors was
    about 1.4 ms of each SmolLM2 install). Returns whether the digest was adopted (otherwise the hash is
    computed on first use, as always)."""
    from .io.peft_format import adapter_tensors

    if not same_config(model.peft_config[name], config):
        return False
    if held:
        model._hashes[name] = (_version_key(model, name)[0], digest)
        return True
    held = adapter_tensors(model, name, copy=False)
    if held.keys() != tensors.keys():
        return False
    for k, t in held.items():
        other = tensors[k]
        if t.dtype != other.dtype or t.shape != other.shape:
            return False
        same = t.device == other.device and t.data_ptr() == other.data_ptr() and t.stride() == other.stride()
        if not same and not torch.equal(t.detach().cpu(), other.cpu()):  # same: the model holds them (shared)
            return False
    model._hashes[name] = (_version_key(model, name)[0], digest)
    return True


def adapter_hash(config, tensors: dict) -> str:
    """SHA-256 of an adapter config and its tensors (key, dtype, shape and bytes, in key order)."""
    h = hashlib.sha256(config_json(config).encode())
    for k, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return h.hexdigest()


def config_json(config) -> str:
    return json.dumps(config.to_peft_dict(), sort_keys=True, default=str)


def same_config(a, b) -> bool:
    """Whether two configs write the same adapter_config.json (the same object: without serializing either)."""
    return a is b or config_json(a) == config_json(b)


def _listing(model, name) -> tuple:
    """(uids and tensor ids, tensors, modules) of everything adapter ``name`` owns."""
    modules = [m for root in model.adapter_roots(name) for m in root.modules()]
    # the roots and the containers holding them: replacing a root is a registration on its container. A
    # registration counts for its own adapter only (a serving pool installing one adapter used to re-list
    # every adapter of the next call, a third of a second per replay of 128 requests)
    changes = model.__dict__.setdefault("_adapter_changes", {})
    for m in modules:
        _tags[m] = (changes, name)
    for container in (model.shared_tensors, *(h.adapters for _, h in model.hosts()),
                      *(s.copies for _, s in model.saved_modules())):
        _tags[container] = (changes, None)
    tensors = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    fixed = (tuple([m.__dict__.get("_graft_uid") for m in modules]), tuple([id(t) for t in tensors]))
    return fixed, tensors, modules
