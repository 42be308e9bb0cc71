"""MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards (Wang et al., 2025, arXiv:2410.00938).

ICLR 2025. Every layer keeps LoRA's form, ΔW = s·B A with A (r × fan_in), B (out × r), s = lora_alpha / r, but
A and B own no parameters: they are assembled from *shards* (pieces of rank vectors) drawn from pools shared by
the layers (Sec. 3), with four "differentiation" strategies that keep shared layers from collapsing onto each other:
- subset selection: each layer uses r vectors picked by a fixed MoE-like routing out of a pool worth e
  (``valid_param_lora_r``) ranks per layer, so r > e ranks cost e ranks of parameters;
- pair dissociation: A's and B's shards are routed independently (A's vector i and B's vector i need not come
  from the same pool pair);
- vector sharding: a rank vector is the concatenation of shards of length d / l (l = ``num_chunk_per_vec``), each
  routed on its own;
- shard privatization: each layer also owns p (``valid_param_private_r``) ranks of private shards that no other
  layer reads; its other r − p vectors come from the shared part of the pool.
Trained parameters = the pool size = e·Σ_layers (fan_in + out): the parameter count of a rank-e LoRA (the paper's
count; p of the e ranks per layer are private), whatever the active rank r.

Following the official code (github.com/Forence1999/MoS, modules/Tied_LoRA.py, which the paper's experiments ran):
- Routing: a layer's A shards are its p·l private shards (its own slice of the private part, in layer order)
  after (r − p)·l shards drawn *without replacement* (a random permutation) from the shared part; B's are drawn
  the same way, independently. Vector j of A is the concatenation of shards j·l … j·l + l − 1 (B likewise, as
  columns). The routing is fixed at creation and never trained.
- Init: the A pool Kaiming-uniform (a = √5) with the fan of a whole vector (bound 1/√fan_in; with layers of
  different widths, the largest fan_in), the B pool zero, so the adapter starts as the base. Dropout on the layer
  input (``lora_dropout``). The official "random scaling" vectors are constant 1 there (any other value is
  refused), so they are left out.
- Defaults: the official scripts (ft_llama2_*.sh) use lora_alpha = 16 and lora_dropout = 0.1 on all seven LLaMA
  projections and take r, e, p and l per run; here lora_alpha = 16, dropout 0 (as peft's LoRA), r = 8, e = 2,
  p = 1, l = 2 (r ≤ p + (e − p)·layers must hold, so a model needs at least 7 adapted layers of one width for
  the defaults; ``tiny_fields`` holds settings for a single small layer).

Where grafting generalises the official code (which is written for LLaMA's seven projection types):
- One global pool per factor (A and B) shared by *all* adapted layers, instead of one pool per projection type.
  So layers of different widths can share it, shards have one length s = G / l, where G is the greatest common
  divisor of every adapted layer's fan_in and out (``num_chunk_per_vec`` must divide G); a vector of width d is
  d / s shards. For models whose adapted layers all have one width d (the official setting per type) a vector is
  exactly l shards of d / l, as in the paper; the pool size stays e·Σ_layers (fan_in + out) in every case.
- The routing is drawn from a generator seeded with sha256("<seed>:<module name>") (first 8 bytes, top bit
  cleared; A's permutation first, then B's), so it is reproducible from the config's ``seed`` and the module name
  (given the same set of adapted layers, which sets the pool's size and each layer's private slice). It is also
  saved with each layer (``mos_route_A`` (r, fan_in / s), ``mos_route_B`` (r, out / s), shard indices into the
  pools, frozen), so an adapter file is self-contained: (A, B) of a layer follow from its routes and the two pools
  (``base_model.mos_A_pool`` (shards, s), ``base_model.mos_B_pool``) without the model.
ΔW is low rank (rank ≤ r): mixed batches take the gathered kernel with the assembled factors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import GraftingError
from ..init_stage import random_init_wanted
from ..registry import register
from .base import FactorMethod


def _int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class MosConfig(AdapterConfig):
    """Configuration of a MoS adapter (field names from the official code).

    r: active rank of every layer's assembled A and B. valid_param_lora_r: e, the equivalent rank the pools hold
    per layer (the adapter trains as many parameters as a rank-e LoRA). valid_param_private_r: p ≤ e, ranks per
    layer of private shards. num_chunk_per_vec: l, shards per vector (see the module docstring for layers of
    different widths). seed: seeds the routing. lora_alpha: s = lora_alpha / r. lora_dropout: dropout on the layer
    input. init_weights: B pool = 0 (True, the official init: the adapter starts as the base); False: random (a
    non-zero update, for tests). fan_in_fan_out: the targets store their weight (in, out) (GPT-2's Conv1D).
    """

    peft_type = "MOS"

    r: int = 8
    valid_param_lora_r: int = 2
    valid_param_private_r: int = 1
    num_chunk_per_vec: int = 2
    seed: int = 0
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    init_weights: bool = True
    fan_in_fan_out: bool = False

    def check(self, bad) -> None:
        for name in ("r", "valid_param_lora_r", "num_chunk_per_vec"):
            if not _int(getattr(self, name), 1):
                raise bad(name, "a positive integer", getattr(self, name))
        p = self.valid_param_private_r
        if not _int(p, 0) or p > self.valid_param_lora_r or p > self.r:
            raise bad("valid_param_private_r", f"an integer in [0, min(r, valid_param_lora_r)] = "
                      f"[0, {min(self.r, self.valid_param_lora_r)}]", p)
        if p == self.valid_param_lora_r and self.r != p:
            raise bad("r", f"equal to valid_param_private_r ({p}) when every pooled rank is private "
                      "(valid_param_private_r == valid_param_lora_r: no shared shards to select from)", self.r)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "an integer", self.seed)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not self.lora_alpha > 0:
            raise bad("lora_alpha", "a positive number (0 makes an adapter that never changes the output)",
                      self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a number in [0, 1)", self.lora_dropout)
        for flag in ("init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "true or false", getattr(self, flag))


def layer_seed(seed: int, module_name: str) -> int:
    """The seed of one layer's routing: sha256("<seed>:<module name>"), first 8 bytes, top bit cleared."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shard_size(cfg: MosConfig, sizes: list[tuple[int, int]]) -> int:
    g = 0
    for fan_in, out in sizes:
        g = math.gcd(math.gcd(g, fan_in), out)
    if g % cfg.num_chunk_per_vec:
        raise GraftingError(f"MosConfig: field 'num_chunk_per_vec' must divide {g}, the greatest common divisor of "
                            f"the adapted layers' widths, got {cfg.num_chunk_per_vec}")
    return g // cfg.num_chunk_per_vec


def routing(cfg: MosConfig, targets: list[tuple[str, int, int]], s: int) -> dict:
    """module name -> (A route (r, fan_in / s), B route (r, out / s)) for (name, fan_in, out) in layer order.

    Pool layout per factor: the shared part ((e − p) ranks of every layer, in shards) first, then each layer's
    private slice (p ranks) in layer order."""
    e, p, r = cfg.valid_param_lora_r, cfg.valid_param_private_r, cfg.r
    plan: dict = {name: [] for name, _, _ in targets}
    for side in (1, 2):  # A (vectors of width fan_in), then B (width out)
        widths = [(t[0], t[side] // s) for t in targets]
        shared = private_at = (e - p) * sum(n for _, n in widths)
        for name, n in widths:
            if (r - p) * n > shared:
                raise GraftingError(f"MosConfig: field 'r' must be at most {p + shared // n} for layer '{name}' "
                                    f"(valid_param_private_r, plus its vectors drawn without replacement from the "
                                    f"shared pool: {shared} shards, {n} per vector), got {r}")
            plan[name].append((n, private_at, shared))
            private_at += p * n
    out = {}
    for name, _, _ in targets:
        g = torch.Generator(device="cpu").manual_seed(layer_seed(cfg.seed, name))
        pair = []
        for n, start, shared in plan[name]:  # A's draw, then B's: independent (pair dissociation)
            picked = torch.randperm(shared, generator=g)[: (r - p) * n]
            pair.append(torch.cat([picked, torch.arange(start, start + p * n)]).reshape(r, n))
        out[name] = tuple(pair)
    return out


def assemble(pool_A: torch.Tensor, pool_B: torch.Tensor, route_A: torch.Tensor, route_B: torch.Tensor):
    """(A (r, fan_in), B (out, r)): vector j of A is the concatenation of shards route_A[j, :] (B: columns)."""
    r = route_A.shape[0]
    return pool_A[route_A.reshape(-1)].reshape(r, -1), pool_B[route_B.reshape(-1)].reshape(r, -1).t()


class MosShared(nn.Module):
    """The two shard pools of one MoS adapter, shared (and trained) by all its layers, and the routing."""

    def __init__(self, cfg: MosConfig, targets: list[tuple[str, int, int]], dtype, device):
        super().__init__()
        self.shard = s = shard_size(cfg, [(f, o) for _, f, o in targets])
        e = cfg.valid_param_lora_r
        n_A, n_B = (e * sum(t[side] // s for t in targets) for side in (1, 2))
        self.mos_A_pool = nn.Parameter(torch.zeros(n_A, s, dtype=dtype, device=device))
        self.mos_B_pool = nn.Parameter(torch.zeros(n_B, s, dtype=dtype, device=device))
        self.routes = routing(cfg, targets, s)
        if random_init_wanted():
            with torch.no_grad():  # Kaiming-uniform (a = √5) over a whole vector's fan: bound 1/√fan
                bound = 1.0 / math.sqrt(max(t[1] for t in targets))
                self.mos_A_pool.uniform_(-bound, bound)
                if not cfg.init_weights:
                    self.mos_B_pool.uniform_(-bound, bound)


class MosAdapter(nn.Module):
    def __init__(self, route_A: torch.Tensor, route_B: torch.Tensor, scaling: float, dropout: float,
                 shared: MosShared):
        super().__init__()
        device = shared.mos_A_pool.device
        self.register_buffer("mos_route_A", route_A.to(device))
        self.register_buffer("mos_route_B", route_B.to(device))
        self.r, self.scaling = route_A.shape[0], scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule: the model owns the pools

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return assemble(self.shared.mos_A_pool, self.shared.mos_B_pool, self.mos_route_A, self.mos_route_B)

    def extra_repr(self) -> str:
        return f"r={self.r}, shards per vector: A {self.mos_route_A.shape[1]}, B {self.mos_route_B.shape[1]}"


@register("mos", config=MosConfig)
class Mos(FactorMethod):
    """Mixture of Shards: LoRA factors assembled from routed shards of pools shared by all layers."""

    layer_kinds = frozenset({"linear", "conv1d"})
    # one 12 -> 10 layer: every shared shard is drawn (r - p <= e - p) and l divides gcd(12, 10)
    tiny_fields = {"r": 2, "valid_param_lora_r": 2, "valid_param_private_r": 1, "num_chunk_per_vec": 2}

    def create_shared(self, cfg, targets):
        sizes = [(name, *h.kind.in_out(h.base_layer)) for name, h in targets]
        w = targets[0][1].dense_weight()
        return MosShared(cfg, sizes, w.dtype if w.is_floating_point() else torch.float32, w.device)

    def create(self, host, cfg, module_name, shared):
        route_A, route_B = shared.routes[module_name]
        return MosAdapter(route_A, route_B, cfg.lora_alpha / cfg.r, cfg.lora_dropout, shared)

    def peft_keys(self, kind):
        return {"mos_route_A": "mos_route_A", "mos_route_B": "mos_route_B"}

    def shared_keys(self, cfg):
        return {"base_model.mos_A_pool": "mos_A_pool", "base_model.mos_B_pool": "mos_B_pool"}

    def factors_from_tensors(self, tensors, cfg, module_name, kind, shared):
        route_A, route_B = tensors["mos_route_A"].long(), tensors["mos_route_B"].long()
        pool_A, pool_B = shared["mos_A_pool"], shared["mos_B_pool"]
        if route_A.shape[0] != cfg.r or route_B.shape[0] != cfg.r or int(route_A.max()) >= pool_A.shape[0] \
                or int(route_B.max()) >= pool_B.shape[0] or int(min(route_A.min(), route_B.min())) < 0:
            raise GraftingError(f"MoS layer '{module_name}': routes of shapes {tuple(route_A.shape)} / "
                                f"{tuple(route_B.shape)} do not fit r={cfg.r} and pools of {pool_A.shape[0]} / "
                                f"{pool_B.shape[0]} shards")
        A, B = assemble(pool_A, pool_B, route_A, route_B)
        return A, B, cfg.lora_alpha / cfg.r

    def rank_from_shapes(self, shapes):
        return shapes["mos_route_A"][0] if "mos_route_A" in shapes else None
