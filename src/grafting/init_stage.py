"""The init stage: after every layer's adapter exists, each method may read its layer's base weight and the
activations it saw over a few calibration batches (EVA, CorDA), and may change the base weight (PiSSA, OLoRA).

A base-changing init is recorded: the adapter's tensors right after init are kept on the model
(``model._initial``), so that ``save_adapter`` can write a delta against the original base and
``delete_adapter`` can put the original back (``Method.to_original_base`` / ``Method.undo_init``).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .errors import GraftingError


_FILLING = contextvars.ContextVar("grafting_filling_from_disk", default=False)


@contextlib.contextmanager
def filling_from_disk():
    """Adapters created inside are filled from a saved file right after: every tensor the file holds will be
    overwritten, so a method may skip drawing random initial values for those (loading 100 adapters spent
    half its time on random numbers it then discarded)."""
    token = _FILLING.set(True)
    try:
        yield
    finally:
        _FILLING.reset(token)


def random_init_wanted() -> bool:
    """False while an adapter is being created only to be filled from disk (see ``filling_from_disk``)."""
    return not _FILLING.get()


def calibration_statistics(model, method, config, hosts, calibration) -> dict:
    """Per target layer, the method's statistic of the inputs that layer's base saw over the calibration batches
    (``Method.calibration_statistic``; rows chosen by ``Method.calibration_mask``)."""
    inputs = collect_activations(model, hosts, calibration, mask_fn=lambda b: method.calibration_mask(config, b))
    return {n: method.calibration_statistic(config, xs) for n, xs in inputs.items()}


def run_init(model, name, method, config, hosts, activations: dict | None = None) -> None:
    """The init stage: after every layer exists, each adapter may read its layer's calibration statistic
    (``activations``: module -> statistic, from :func:`calibration_statistics`) and the base weight, and may
    change the base weight (then recorded for save/delete)."""
    activations = activations or {}
    changes = method.changes_base(config)
    if changes:
        for module_name, host in hosts:
            why = host.can_write_weight()
            if why is not None:
                raise GraftingError(f"module '{module_name}': this init rewrites the base weight, but {why}")
            others = sorted(a for a in host.adapters if a != name)
            if others:  # they were trained on the original weight: their outputs would change silently
                init = getattr(config, "init_lora_weights", None)
                what = f"init_lora_weights={init!r}" if isinstance(init, str) else f"method '{method.name}'"
                raise GraftingError(
                    f"module '{module_name}': adapter '{name}' ({what}) rewrites the base weight, which adapters "
                    f"{others} also apply to. Add it to a model without "
                    "them, or load a copy saved converted to the original base (save_adapter's default; peft: "
                    "path_initial_model_for_weight_conversion)")
    done = []
    try:
        for module_name, host in hosts:
            method.init(host.adapters[name], host, config, activations.get(module_name))
            done.append((module_name, host))
            if changes:
                adapter = host.adapters[name]
                model._initial.setdefault(name, {})[module_name] = {
                    attr: getattr(adapter, attr).detach().clone()
                    for attr in method.peft_keys(host.kind.name).values()}
    except Exception:
        for module_name, host in done:
            if changes:
                method.undo_init(model._initial[name][module_name], host.adapters[name], host, config)
        model._initial.pop(name, None)
        raise


@torch.no_grad()
def collect_activations(model, hosts, calibration, max_rows: int = 65536, mask_fn=None) -> dict:
    """Inputs seen by each target layer's base over the calibration batches, in eval mode (no dropout noise): per
    layer, one (rows, fan_in) tensor per forward call, at most ``max_rows`` rows in all. ``mask_fn(batch)``: a
    boolean mask over the batch's leading dimensions (e.g. non-padding tokens) selecting the rows kept, or None."""
    seen: dict = {n: [] for n, _ in hosts}
    mask = None
    handles = []
    for module_name, host in hosts:
        def hook(_module, args, module_name=module_name):
            x = args[0]
            room = max_rows - sum(t.shape[0] for t in seen[module_name])
            if x.is_floating_point() and room > 0:
                rows = x.detach()[mask] if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) else x
                seen[module_name].append(rows.detach().reshape(-1, x.shape[-1])[:room].float())
        handles.append(host.base_layer.register_forward_pre_hook(hook))
    count = 0
    token = model._routing._enabled.set(False)  # the base alone: activations of the layer the adapter wraps
    modes = [(m, m.training) for m in model.base_model.modules()]
    model.base_model.eval()
    try:
        for batch in calibration:
            count += 1
            mask = mask_fn(batch) if mask_fn is not None else None
            if isinstance(batch, dict):
                model.base_model(**batch)
            elif isinstance(batch, (tuple, list)):
                model.base_model(*batch)
            else:
                model.base_model(batch)
    finally:
        model._routing._enabled.reset(token)
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()
    if count == 0:
        raise GraftingError("calibration: no batches given")
    missing = [n for n, xs in seen.items() if not xs]
    if missing:
        raise GraftingError(f"calibration: the batches never reached modules {missing[:5]}")
    return seen
