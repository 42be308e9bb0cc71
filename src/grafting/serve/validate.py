"""Check an adapter as read against the served model without touching the model (:class:`ModelCheck`).

An explicit load (``/v1/load_lora_adapter``, ``graft serve --adapter``) should be refused when it could never
serve, as vLLM's is, rather than accepted and then failing every request for it. The checks that say so are
the install's own (targets present, tensors as the config and the modules imply: keys, dtypes, shapes), and an
install changes the model, which only the thread running it may do while it serves. So the adapter is
installed into a copy of the model's module tree whose parameters and buffers live on the meta device (no
storage, nothing computed) and removed again.
"""

from __future__ import annotations

import copy
import logging
import threading

import torch

from ..errors import GraftingError
from ..io.peft_format import install_adapter

log = logging.getLogger("grafting.serve")

_SCRATCH = "grafting-check"


def meta_copy(model):
    """``model`` (an AdaptedModel) copied with every parameter and buffer on the meta device: its structure,
    shapes and dtypes, no tensor data."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.to("meta")
    return copy.deepcopy(model, memo)


class ModelCheck:
    """``check(config, tensors, path)`` raises GraftingError (naming the file, as an install would) when the
    adapter cannot install into ``model``. The meta copy is made on first use, while holding ``model_lock``
    (the lock the pool holds while it changes the model), so it never sees an install half done."""

    def __init__(self, model, model_lock):
        self.model, self.model_lock = model, model_lock
        self._skeleton = None
        self._unavailable = False
        self._lock = threading.Lock()  # one check at a time on the copy

    def _copy(self):
        for attempt in range(3):
            if self._skeleton is not None or self._unavailable:
                break
            with self.model_lock:
                try:
                    self._skeleton = meta_copy(self.model)
                except Exception as e:
                    # a decode step filling a cache mid-copy changes a dict under it: try again; a module that
                    # cannot be copied fails every time, and loads then check the files only
                    if attempt == 2:
                        self._unavailable = True
                        log.warning("adapter loads check files only: the model cannot be copied to the meta "
                                    "device (%s: %s)", type(e).__name__, e)
        return self._skeleton

    def __call__(self, config, tensors: dict, path) -> None:
        with self._lock:
            skeleton = self._copy()
            if skeleton is None:
                return
            try:
                # no metadata: a base fingerprint compares real base weights, which the install checks
                install_adapter(skeleton, _SCRATCH, config, tensors, path, None, finite_checked=True,
                                training=False)
            except GraftingError:
                raise  # the install's own refusal: it would refuse the same on the model
            except Exception as e:  # an init that needs real values (e.g. .item()): the install checks it
                log.debug("%s: not checked against the model on the meta device (%s: %s)", path,
                          type(e).__name__, e)
            finally:
                if _SCRATCH in skeleton.peft_config:
                    try:
                        skeleton.delete_adapter(_SCRATCH)
                    except Exception:
                        self._skeleton = None  # cannot be undone: a fresh copy next time
