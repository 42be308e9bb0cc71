"""Trimming a task vector τ = θ_model − θ_base before it is merged, and TIES's sign election.

Four ways to keep a ``density`` fraction of τ, each the drop step of a merge method:

- :func:`trim_magnitude` (TIES, Yadav et al., arXiv 2306.01708, Algorithm 1 step "Trim"): keep the
  top-k entries by |τ|, k = max(1, ⌊density·n⌋).
- :func:`drop_random` (DARE, Yu et al., arXiv 2311.03099): keep each entry independently with probability
  ``density`` (a Bernoulli mask drawn from ``generator``).
- :func:`trim_outliers` (Model Breadcrumbs, Davari & Belilovsky, arXiv 2312.06795): drop the largest
  ``gamma`` fraction (outliers) and the smallest entries, keeping ⌊density·n⌋ in between.
- :func:`drop_magprune` (DELLA's MAGPRUNE, Deep et al., arXiv 2406.11617): like DARE, but the keep
  probability grows linearly with the entry's magnitude rank in its row, from density − ε to density + ε.

``rescale=True`` multiplies the kept entries so that the trimmed τ has the L1 norm of the original. The DARE
and DELLA papers rescale each kept entry by 1 / (keep probability); mergekit (which grafting matches, so the
same config gives the same model) matches the L1 norm instead: exact per draw rather than in expectation, and
the same rule for the deterministic trims.

Every function leaves its input untouched and returns a new tensor, except that nothing-to-trim
(``density >= 1``) returns ``tau`` itself, as mergekit does.
"""

from __future__ import annotations

import torch

from ..errors import GraftingError

# mergekit treats norms below this as zero and then skips the rescale rather than divide by ~0.
_RESCALE_EPS = 1e-7


def l1_rescaled(tau: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tau * keep`` scaled so that its L1 norm is ``tau``'s (unscaled when either norm is ~0)."""
    kept = tau * keep
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def _apply(tau: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    keep = keep.reshape(tau.shape).to(tau.dtype)
    return l1_rescaled(tau, keep) if rescale else tau * keep


def _keep_sorted_range(tau: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    # A stable sort makes equal magnitudes resolve by position, so the kept set never depends on the sort kernel.
    order = torch.argsort(tau.abs().reshape(-1), descending=descending, stable=True)
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[order[start:stop]] = True
    return keep


# Entries per slice in the passes below: what they allocate is a few slices, never a tensor's worth.
SLICE = 1 << 20
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    # Non-negative IEEE floats order exactly as their bit patterns do as integers, which bincount can count.
    return x.abs().view(_BITS[x.dtype])


def _slices(n: int):
    return (slice(s, min(s + SLICE, n)) for s in range(0, n, SLICE))


def top_k_threshold(flat: torch.Tensor, k: int) -> tuple[int, int]:
    """The bit pattern of the k-th largest magnitude in ``flat`` (1-D, 1 <= k <= numel) and how many entries
    are strictly larger.

    Radix selection on the magnitudes' bit patterns, 16 bits per pass: each pass counts, slice by slice, the
    next digit of the entries that share the digits found so far. Two passes for float32, O(n) time and O(slice)
    memory; ``torch.kthvalue`` would copy the tensor and allocate int64 indices, three times its size."""
    nbits = flat.element_size() * 8 - 1  # the sign bit is 0 after abs
    prefix, known, rank, greater = 0, 0, k, 0
    while known < nbits:
        width = min(16, nbits - known)
        shift = nbits - known - width
        counts = torch.zeros(1 << width, dtype=torch.int64)
        for sl in _slices(flat.numel()):
            bits = _magnitude_bits(flat[sl])
            if known:
                bits = bits[(bits >> (shift + width)) == prefix]
            counts += torch.bincount((bits >> shift) & ((1 << width) - 1), minlength=1 << width)
        from_top = counts.flip(0).cumsum(0)  # entries whose digit is >= each digit, largest digit first
        i = int(torch.searchsorted(from_top, rank))  # the first digit (from the top) reaching the rank
        above = int(from_top[i - 1]) if i else 0
        digit = (1 << width) - 1 - i
        greater += above
        rank -= above
        prefix = (prefix << width) | digit
        known += width
    return prefix, greater


def keep_top_k_(flat: torch.Tensor, k: int) -> tuple[float, float]:
    """Zero, in place, all but the k largest magnitudes of the 1-D ``flat``; equal magnitudes at the cut are kept
    in position order (the set a stable descending sort would pick). Returns the L1 norms before and after.

    Slice by slice: the threshold from :func:`top_k_threshold`, then one pass applying it."""
    n = flat.numel()
    if k >= n:
        norm = float(flat.abs().sum(dtype=torch.float64))
        return norm, norm
    threshold, greater = top_k_threshold(flat, k)
    short = k - greater  # entries equal to the threshold still to keep, first come first kept
    before = after = 0.0
    for sl in _slices(n):
        part = flat[sl]
        bits = _magnitude_bits(part)
        keep = bits > threshold
        if short > 0:
            equal = bits == threshold
            n_equal = int(equal.sum())
            if n_equal <= short:
                keep |= equal
                short -= n_equal
            else:
                keep[equal.nonzero().squeeze(1)[:short]] = True
                short = 0
        before += float(part.abs().sum(dtype=torch.float64))
        part.mul_(keep)
        after += float(part.abs().sum(dtype=torch.float64))
    return before, after


def trim_magnitude(tau: torch.Tensor, density: float, *, rescale: bool = False,
                   inplace: bool = False) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·n⌋) largest-magnitude entries of ``tau``, zero the rest (TIES "Trim").

    A positive density keeps at least one entry, as mergekit does; ``density <= 0`` gives zeros. ``inplace``
    trims ``tau`` itself (it must be contiguous), allocating only slices, which keeps a merge of N models
    within N + 2 tensors of memory."""
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return tau.zero_() if inplace else torch.zeros_like(tau)
    out = tau if inplace else tau.clone(memory_format=torch.contiguous_format)
    k = max(1, int(density * tau.numel()))
    if out.dtype in _BITS:
        before, after = keep_top_k_(out.view(-1), k)
    else:  # no float bit pattern to count (complex, integer): sort
        flat = out.view(-1)
        order = torch.argsort(flat.abs(), descending=True, stable=True)
        flat[order[k:]] = 0
        before, after = float(tau.abs().sum()), float(out.abs().sum())
    if rescale and before >= _RESCALE_EPS and after >= _RESCALE_EPS:
        out.mul_(before / after)
    return out


def drop_random(tau: torch.Tensor, density: float, *, generator: torch.Generator | None = None,
                rescale: bool = False) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE's drop rate p = 1 − density), from ``generator``.

    The mask is ``torch.bernoulli`` of a tensor filled with ``density``, the draw mergekit makes: with the same
    seed and the same order of calls the two masks are identical. ``None`` draws from torch's global generator."""
    if density >= 1:
        return tau
    # Drawing even when nothing can be kept keeps the random stream aligned with mergekit's for later models.
    probs = torch.full_like(tau, max(float(density), 0.0))
    return _apply(tau, torch.bernoulli(probs, generator=generator), rescale)


def trim_outliers(tau: torch.Tensor, density: float, gamma: float, *, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs' mask: drop the ⌊gamma·n⌋ largest entries and enough of the smallest to keep
    ⌊density·n⌋.

    Keeping the density wins over dropping outliers: when density + gamma > 1, fewer of the largest entries
    are dropped (mergekit's rule). Unlike :func:`trim_magnitude`, a small density may keep nothing."""
    if density >= 1:
        return tau
    n = tau.numel()
    target = max(0, int(density * n))
    n_top = max(0, int(gamma * n))
    n_bottom = max(0, n - target - n_top)
    return _apply(tau, _keep_sorted_range(tau, n_bottom, n_bottom + target, descending=False), rescale)


def magprune_keep_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's per-entry keep probabilities: density − ε for the smallest |τ| of a row, density + ε for the
    largest, linear in the magnitude rank between (shape ``tau.shape``).

    Rows are as mergekit ranks them: a tensor of two or more dimensions is ranked along dim 1 (per output row of
    a weight matrix), a vector or scalar as one row. A row of one entry gets the middle probability, density;
    mergekit computes 0/0 there and fails."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(width, device=tau.device).view(1, width, *([1] * (rows.dim() - 2)))
    rank.scatter_(1, order, positions.expand_as(order))
    rank_norm = rank.to(tau.dtype) / (width - 1) if width > 1 else torch.full_like(rows, 0.5)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(tau.shape)


def drop_magprune(tau: torch.Tensor, density: float, epsilon: float, *, generator: torch.Generator | None = None,
                  rescale: bool = False) -> torch.Tensor:
    """DELLA's MAGPRUNE drop: keep each entry with its :func:`magprune_keep_probabilities` probability.

    Needs 0 < density − ε and density + ε < 1 when 0 < density < 1 (a probability must stay a probability);
    ``epsilon = 0`` is DARE. Like :func:`drop_random` the mask is ``torch.bernoulli`` of the probabilities, the
    draw mergekit makes."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise GraftingError(f"della: epsilon {epsilon} with density {density}: density ± epsilon must lie "
                            f"strictly between 0 and 1")
    probs = magprune_keep_probabilities(tau, density, epsilon)
    return _apply(tau, torch.bernoulli(probs, generator=generator), rescale)


def elect_sign(deltas, method: str = "sum") -> torch.Tensor:
    """TIES "Elect" and the disjoint-merge selection: a bool mask over the (weighted) task vectors ``deltas``
    (a sequence of same-shape tensors, or one tensor with models along dim 0), stacked along dim 0, True where an
    entry's sign is the elected one.

    ``sum``: the sign of the summed mass Σ_i τ_i (TIES, Algorithm 1); ``count``: the sign most models have.
    A tie (sum exactly 0) elects +, as mergekit does. Zero entries, trimmed ones included, never agree, so they
    drop out of the disjoint mean's divisor. The election is entry-wise, so it can run on slices of the task
    vectors (the merge does, to bound its memory)."""
    if method not in ("sum", "count"):
        raise GraftingError(f"unknown sign election '{method}'; expected 'sum' or 'count'")
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        total.add_(d if method == "sum" else d.sign())
    positive = total >= 0
    return torch.stack([torch.where(positive, d > 0, d < 0) for d in deltas])
