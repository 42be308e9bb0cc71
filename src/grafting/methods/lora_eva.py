"""EVA: Explained Variance Adaptation (Paischer et al., 2024, arXiv:2410.07170): ``init_lora_weights="eva"``.

Sec. 3 of the paper: for each target layer, the SVD of its inputs X over calibration batches,
X = U Σ Vᵀ, computed incrementally batch by batch (incremental PCA, Ross et al. 2008) until the top components
stop moving: a component counts as converged when its cosine similarity with the previous batch's is ≥ τ (peft's
``tau``, default 0.99). A = the layer's top right singular vectors V_rᵀ (whitened by Σ^{-1/2} if ``whiten``),
B = 0, so the base is untouched and training starts from it. Rank redistribution (Sec. 3): each layer computes up
to round(ρ·r) components; the budget Σ r over layers goes to the components with the largest explained variance
ratio across all layers, so a layer ends with between 0 and round(ρ·r) ranks (0: no adapter on that layer). With
``adjust_scaling_factors`` a layer's α is multiplied by new_rank / r (its α/r unchanged). Defaults (peft's
EvaConfig): ρ = 2 (1 = no redistribution), τ = 0.99.

Following peft's port (peft.tuners.lora.eva, whose results these match): the incremental PCA centres the data
and uses a randomized SVD with 2·n components, 4 iterations and seed 42 (the caller's random state is kept);
signs follow sklearn's ``svd_flip`` on V; layers whose inputs on the first batch are equal share one SVD and the
one computed for gets at least the rank of the others; the batches are cycled until every layer's kept
components converged, a layer that converged stops updating (and resumes if redistribution asks it for more
components than converged). Rows: the calibration batches' rows, without padding (``attention_mask``) and, with
``use_label_mask``, without positions whose ``labels`` equal ``label_mask_value`` (dict batches).
Deviations: the activations are collected once (``add_adapter``'s limit of 65,536 rows per layer) and then
cycled, instead of re-running the model; peft cycles forever when components never converge, grafting stops
after :data:`MAX_STEPS` forward steps with an error; the number of components is capped at the layer's input
size (peft raises there).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
import torch.nn.functional as F

from ..errors import GraftingError

EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}
MAX_STEPS = 10_000


def check_eva_config(cfg, bad) -> None:
    ec = cfg.eva_config
    if ec is None:
        return
    if not isinstance(ec, dict):
        raise bad("eva_config", "a mapping of EvaConfig fields or null", ec)
    for key, value in ec.items():
        if key not in EVA_DEFAULTS:
            raise bad(f"eva_config[{key!r}]", f"one of the EvaConfig fields {sorted(EVA_DEFAULTS)}", key)
        want = type(EVA_DEFAULTS[key])
        if isinstance(value, bool) != (want is bool) or not isinstance(value, (int, float) if want is float else want):
            raise bad(f"eva_config[{key!r}]", f"a {want.__name__}", value)
    if not eva_setting(cfg, "rho") >= 1.0:
        raise bad("eva_config['rho']", "a number >= 1 (the largest rank a layer may get is rho·r)", ec["rho"])
    if not 0.0 <= eva_setting(cfg, "tau") <= 1.0:
        raise bad("eva_config['tau']", "a cosine similarity threshold in [0, 1]", ec["tau"])


def eva_setting(cfg, key):
    return {**EVA_DEFAULTS, **(cfg.eva_config or {})}[key]


def eva_mask(cfg, batch):
    """Non-padding (and, with use_label_mask, labelled) positions of a dict batch; None otherwise (all rows)."""
    if not isinstance(batch, dict) or ("attention_mask" not in batch and "input_ids" not in batch):
        return None
    mask = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"]).bool()
    if eva_setting(cfg, "use_label_mask") and "labels" in batch:
        mask = mask & (batch["labels"] != eva_setting(cfg, "label_mask_value"))
    return mask


class IncrementalSvd:
    """Incremental PCA (sklearn's algorithm, peft's randomized variant): one ``update`` per batch keeps the top
    ``n`` components of all rows seen so far, centred by their running mean."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0
        self.mean = self.var = self.components = self.singular_values = self.ratio = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.float().clone()
        rows = x.shape[0]
        total = self.seen + rows
        new_sum = x.sum(0, dtype=torch.float64)
        last_sum = torch.zeros_like(new_sum) if self.mean is None else self.mean * self.seen
        mean = (last_sum + new_sum) / total
        dev = x - new_sum / rows  # float64, as in the running variance of sklearn / peft
        new_var = dev.square().sum(0) - dev.sum(0).square() / rows
        if self.var is not None:
            ratio = self.seen / rows
            new_var = self.var * self.seen + new_var + ratio / total * (last_sum / ratio - new_sum).square()
        var = new_var / total
        if self.components is None:
            x -= mean
        else:
            batch_mean = x.mean(0)
            x -= batch_mean
            correction = ((self.seen / total) * rows) ** 0.5 * (self.mean - batch_mean)
            x = torch.vstack((self.singular_values[:, None] * self.components, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(42)
            U, S, V = torch.svd_lowrank(x, q=2 * self.n, niter=4)
        Vt = V.mH
        signs = torch.sign(Vt[torch.arange(Vt.shape[0]), Vt.abs().argmax(1)])
        Vt = Vt * signs[:, None]
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular_values = Vt[: self.n], S[: self.n]
        self.ratio = (S.square() / (var * total).sum())[: self.n]


def eva_plan(cfg, inputs: dict):
    """peft's get_eva_state_dict + _load_eva_state_dict on collected inputs (module -> per-batch row tensors):
    returns the revised config (target_modules, rank_pattern, alpha_pattern) and module -> A (rank × fan_in)."""
    names = list(inputs)
    rank = {n: cfg.rank_and_alpha(n)[0] for n in names}
    rho, tau = float(eva_setting(cfg, "rho")), float(eva_setting(cfg, "tau"))
    fan_in = {n: inputs[n][0].shape[-1] for n in names}
    max_comp = {n: min(round(rank[n] * rho), fan_in[n]) for n in names}
    budget = sum(rank.values())
    # layers fed the same input (q, k, v of one block) share the SVD of the first of them
    same = {}
    for i, n in enumerate(names):
        for m in names[:i]:
            if m not in same and torch.equal(inputs[n][0], inputs[m][0]):
                same[n] = m
                break
    for m in set(same.values()):  # one SVD serves the group: as many components as its largest member needs
        group = [n for n in names if same.get(n, n) == m]
        top = max(max_comp[n] for n in group)
        max_comp.update({n: top for n in group})
    hooked = [n for n in names if n not in same]
    owner = {**{n: n for n in hooked}, **same}
    svd = {n: IncrementalSvd(max_comp[n]) for n in hooked}
    converged = {n: torch.zeros(max_comp[n], dtype=torch.bool) for n in hooked}
    done = {n: False for n in hooked}
    active = {n: True for n in hooked}
    dist = dict(max_comp)
    batches = len(inputs[names[0]])
    for step in range(MAX_STEPS + 1):
        for n in hooked:
            ok = bool(converged[n][: dist[n]].all())
            if not done[n] and ok and active[n]:
                active[n], done[n] = False, True
            elif done[n] and not ok:
                active[n], done[n] = True, False
        if all(done.values()):
            break
        if step == MAX_STEPS:
            raise GraftingError(f"init_lora_weights='eva': components did not converge (cosine similarity >= "
                                f"eva_config['tau'] = {tau}) within {MAX_STEPS} steps over the calibration batches; "
                                "give more or more varied batches, or lower tau")
        for n in hooked:
            x = inputs[n][step % batches] if step % batches < len(inputs[n]) else None
            if not active[n] or x is None or x.shape[0] < max_comp[n]:
                continue
            before = svd[n].components
            svd[n].update(x)
            if before is not None:
                converged[n] = F.cosine_similarity(svd[n].components, before) >= tau
        if all(svd[n].components is not None for n in hooked):
            dist = _distribute(svd, owner, max_comp, budget, same)
    A, rank_pattern, alpha_pattern, targets = {}, {}, {}, []
    for n in names:
        new_rank = dist[n]
        r, alpha = cfg.rank_and_alpha(n)
        if new_rank == 0:
            continue
        u = svd[owner[n]].components[:new_rank]
        if eva_setting(cfg, "whiten"):
            u = u / svd[owner[n]].singular_values[:new_rank].sqrt()[:, None]
        A[n] = u
        targets.append(n)
        if new_rank != r and eva_setting(cfg, "adjust_scaling_factors"):
            alpha = alpha * new_rank / r
        if new_rank != cfg.r:
            rank_pattern[n] = new_rank
        if alpha != cfg.lora_alpha:
            alpha_pattern[n] = alpha
    if not targets:
        raise GraftingError("init_lora_weights='eva': the rank redistribution left no layer with a rank")
    return dataclasses.replace(cfg, target_modules=targets, rank_pattern=rank_pattern,
                               alpha_pattern=alpha_pattern, exclude_modules=None, layers_to_transform=None,
                               layers_pattern=None), A


def _distribute(svd, owner, max_comp, budget, same) -> dict:
    """The budget's ranks go to the components with the largest explained variance ratio over all layers."""
    keys, values = zip(*[(n, v) for n, h in owner.items() for v in svd[h].ratio[: max_comp[h]]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    counts = {n: counts.get(n, 0) for n in owner}
    for n, h in same.items():  # the layer the SVD was computed for keeps the larger rank
        if counts[h] < counts[n]:
            counts[h], counts[n] = counts[n], counts[h]
    return counts
