"""ComPEFT: compress a LoRA-family adapter to sparse signs and one scale per tensor, and back to PEFT format.

ComPEFT (Yadav, Choshen, Raffel & Bansal, arXiv 2311.13171, the method section) compresses a task vector
τ = θ_ft − θ_init in two steps: keep the top-k% entries of |τ| (the rest become 0), then replace every kept
magnitude by one constant, τ̃ = α·σ(τ)·γ̃, where γ̃ ∈ {−1, 0, +1} is the sign of τ on the kept entries and σ(τ)
the standard deviation of the whole of τ. The paper picks α on validation data; the official code
(github.com/prateeky2806/ComPEFT, ``compress_and_update_parms``) uses ``replace_factor * tv.std()`` with a
default of 1 and, for LoRA, takes θ_init = 0: the factors themselves are the task vector.

What is compressed, and why
- The LoRA factors A and B, each as its own task vector against 0 (the official code's choice). B starts at 0,
  so B *is* its task vector. A starts random and the adapter does not record that start, so A − A₀ cannot be
  formed; but a trained A is still mostly that random projection of the layer's input, and its top-k signs are
  a sparse sign matrix well correlated with it row by row (sparse sign matrices are random projections too,
  Achlioptas 2003), so B·Â·x keeps most of B·A·x. Measured on the benchmark's adapter (density 0.1, default
  scale): compressing A alone moved the validation loss by 0.003, compressing B alone by 0.033. Rejected: the
  dense ΔW = s·B·A costs more at 10% density than both factors in fp32 (an r=8, 384×384 layer: 147k mask bits
  against 6k floats) and goes back to LoRA only through a lossy refactorisation; re-solving B by least
  squares against the compressed A shrinks ΔW and lost about 2 points of accuracy more than not doing it.
- The scale. ΔW = s·B̂·Â multiplies the two factors' scales, so a scale that shrinks each factor shrinks ΔW
  twice: the official code's default α = 1 keeps only a fraction ``density`` of each factor's energy, and on
  the benchmark's adapter (benchmarks/compress.py) lost about 5 points of accuracy at density 0.1, as did the
  least-squares magnitude (mean |τ| of the kept entries). The default ``scale="norm"`` needs no validation data: each
  tensor keeps its L2 norm, s = ‖τ‖₂/√k (α = ‖τ‖₂/(σ(τ)·√k) ≈ 1/√density for a zero-mean τ). A float
  ``scale`` is the paper's α, for α picked on validation data as the paper does.
- Stored as is (bit-exact): every tensor that is not a LoRA factor (DoRA magnitudes, which start at ‖W₀‖ and
  are not deltas from 0; AutoLoRA gates, BiLoRA singular values; biases and ``modules_to_save`` copies, which
  are absolute weights whose base the adapter does not hold), non-float tensors, and factors of fewer than
  ``min_numel`` entries (σ of a handful of numbers is no scale, and the scale plus the manifest entry cost about
  what the raw floats do).

On-disk format (``FORMAT`` version 1): a directory with ``compeft.safetensors`` and ``compeft.json``; no
pickle. The manifest lists every source tensor in order (key, shape, dtype, ``stored`` = "compeft" or "raw";
for compressed ones the survivor ``count`` and the position ``encoding``), the density and scale, the source
safetensors metadata and the source ``adapter_config.json`` verbatim. The payload holds three uint8/float32
blobs, each tensor's part following the previous one's (offsets follow from the sizes, which are checked):
``compeft.positions`` (where the survivors are), ``compeft.signs`` (one bit per survivor, 1 = negative,
least-significant bit first, in position order) and ``compeft.scales`` (one float32 per compressed tensor),
plus each raw tensor under its own key. Positions use whichever encoding is smaller for that tensor: a bit
mask costs n bits whatever the density; gaps between consecutive positions cost k·8w bits in the smallest
width w ∈ {1, 2, 4, 8} bytes that holds the largest gap, so they win below density 1/(8w) (12.5% with one-byte
gaps, which fit while survivors are spread and dense enough, 6.25% with two-byte ones); "all" (k = n) costs
nothing. So a factor of n entries costs at most ⌈n/8⌉ + ⌈k/8⌉ + 4 bytes, k = ⌈density·n⌉.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..errors import GraftingError
from ..io.atomic import atomic_dir
from ..io.reader import CONFIG_NAME, WEIGHTS_NAME, AdapterReader

__all__ = ["FORMAT", "VERSION", "MANIFEST_NAME", "PAYLOAD_NAME", "CompressedTensor", "CompressResult", "compress",
           "compress_tensor", "decompress", "decompress_tensor", "read_compressed"]

FORMAT = "grafting-compeft"
VERSION = 1
MANIFEST_NAME = "compeft.json"
PAYLOAD_NAME = "compeft.safetensors"
POSITIONS, SIGNS, SCALES = "compeft.positions", "compeft.signs", "compeft.scales"
COMPRESSED_ROLES = ("lora_A", "lora_B")
_WIDTHS = (1, 2, 4, 8)  # bytes per gap
ENCODINGS = ("all", "mask") + tuple(f"delta{8 * w}" for w in _WIDTHS)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(frozen=True)
class CompressedTensor:
    """One tensor as ComPEFT stores it: ``count`` survivors at ``positions`` (packed per ``encoding``) with
    ``signs`` (1 bit each), all of magnitude ``scale``; everything else is 0."""

    shape: tuple
    dtype: torch.dtype
    count: int
    encoding: str
    positions: torch.Tensor  # uint8
    signs: torch.Tensor  # uint8
    scale: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Payload bytes: positions, signs and the float32 scale."""
        return self.positions.numel() + self.signs.numel() + 4


@dataclass(frozen=True)
class CompressResult:
    path: Path
    density: float
    scale: float | str
    original_bytes: int  # adapter_config.json + adapter_model.safetensors
    compressed_bytes: int  # the manifest + the payload
    compressed_tensors: int
    raw_tensors: int

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes


# ---- one tensor -------------------------------------------------------------------------------------------------
def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise GraftingError(f"density: {density!r} is outside (0, 1] (the fraction of entries kept)")
    return float(density)


def _check_scale(scale) -> float | str:
    if scale == "norm":
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise GraftingError(f"scale: {scale!r} is neither 'norm' nor a positive number (the paper's α)")
    return float(scale)


def _survivors(t: torch.Tensor, density: float) -> torch.Tensor:
    """Flat positions (ascending) of the top ⌈density·n⌉ entries by magnitude; ties go to the lower position.
    Zeros never survive: their sign is neither bit."""
    flat = t.detach().reshape(-1)
    # round first: 0.1 * 30 is 3.0000000000000004 in floating point, and ceil would keep a fourth entry
    k = min(math.ceil(round(density * flat.numel(), 9)), int(torch.count_nonzero(flat)))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def _encode_positions(idx: np.ndarray, n: int) -> tuple[str, bytes]:
    k = idx.size
    if k == n:
        return "all", b""
    gaps = np.diff(idx, prepend=-1) - 1  # ≥ 0; -1 because consecutive positions are never equal
    largest = int(gaps.max()) if k else 0
    width = next(w for w in _WIDTHS if largest < 256 ** w)
    mask_bytes = (n + 7) // 8
    if k * width < mask_bytes:
        return f"delta{8 * width}", gaps.astype(f"<u{width}").tobytes()
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return "mask", np.packbits(mask, bitorder="little").tobytes()


def _positions_nbytes(encoding: str, n: int, count: int) -> int:
    if encoding == "all":
        return 0
    if encoding == "mask":
        return (n + 7) // 8
    return count * int(encoding[5:]) // 8


def _decode_positions(encoding: str, data: np.ndarray, n: int, count: int, where: str) -> np.ndarray:
    if encoding == "all":
        if count != n:
            raise GraftingError(f"{where}: encoding 'all' with count {count} of {n} entries")
        return np.arange(n, dtype=np.int64)
    if encoding == "mask":
        idx = np.flatnonzero(np.unpackbits(data, count=n, bitorder="little"))
        if idx.size != count:
            raise GraftingError(f"{where}: the position mask marks {idx.size} entries, count says {count}")
        return idx
    width = int(encoding[5:]) // 8
    gaps = np.frombuffer(data.tobytes(), dtype=f"<u{width}")
    if width == 8 and gaps.size and int(gaps.max()) >= n:  # would wrap around in int64
        raise GraftingError(f"{where}: a position gap exceeds the tensor's {n} entries")
    idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if idx.size and idx[-1] >= n:
        raise GraftingError(f"{where}: positions run to {int(idx[-1])}, past the tensor's {n} entries")
    return idx


def compress_tensor(t: torch.Tensor, density: float, scale: float | str = "norm") -> CompressedTensor:
    """ComPEFT on one task vector ``t``: its top-``density`` entries by magnitude as signs times one scale,
    ``scale`` × σ(t) for a float ``scale`` (the paper's α; σ with Bessel's correction, as torch.std and the
    official code) or ‖t‖₂/√k for ``"norm"`` (the compressed tensor keeps t's L2 norm)."""
    density, scale = _check_density(density), _check_scale(scale)
    if not t.is_floating_point():
        raise GraftingError(f"compress_tensor: dtype {t.dtype} is not a floating dtype")
    x = t.detach().to("cpu", torch.float64).reshape(-1)
    if not torch.isfinite(x).all():
        raise GraftingError("compress_tensor: the tensor holds NaN or infinite values")
    idx = _survivors(x, density)
    k = idx.numel()
    if k == 0:
        s = 0.0
    elif scale == "norm":
        s = float(x.norm()) / math.sqrt(k)
    else:
        s = scale * float(x.std(correction=1 if x.numel() > 1 else 0))
    encoding, positions = _encode_positions(idx.numpy(), x.numel())
    signs = np.packbits(x[idx].numpy() < 0, bitorder="little").tobytes()
    return CompressedTensor(tuple(t.shape), t.dtype, k, encoding, _u8(positions), _u8(signs),
                            float(np.float32(s)))  # the scale is stored as float32: round it here, once


def decompress_tensor(c: CompressedTensor, where: str = "compressed tensor") -> torch.Tensor:
    """The dense tensor (original shape and dtype): ±scale at the survivors, 0 elsewhere."""
    n = c.numel
    if c.encoding not in ENCODINGS or c.positions.numel() != _positions_nbytes(c.encoding, n, c.count):
        raise GraftingError(f"{where}: {c.positions.numel()} position bytes do not fit encoding {c.encoding!r} "
                            f"with {c.count} survivors of {n}")
    if c.signs.numel() != (c.count + 7) // 8:
        raise GraftingError(f"{where}: {c.signs.numel()} sign bytes for {c.count} survivors")
    idx = _decode_positions(c.encoding, c.positions.numpy(), n, c.count, where)
    negative = np.unpackbits(c.signs.numpy(), count=c.count, bitorder="little").astype(bool)
    values = np.where(negative, -c.scale, c.scale).astype(np.float32)
    out = torch.zeros(n, dtype=torch.float32)
    out[torch.from_numpy(idx)] = torch.from_numpy(values)
    return out.reshape(c.shape).to(c.dtype)


def _u8(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- adapters ---------------------------------------------------------------------------------------------------
def compress(adapter_dir, output_dir, density: float = 0.1, scale: float | str = "norm",
             min_numel: int = 64) -> CompressResult:
    """Compress the PEFT adapter at ``adapter_dir`` into ``output_dir`` (written atomically; see the module
    docstring for what is compressed and the format)."""
    density, scale = _check_density(density), _check_scale(scale)
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 1:
        raise GraftingError(f"min_numel: {min_numel!r} is not a positive integer")
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    reader = AdapterReader(adapter_dir)
    if output_dir.resolve() == adapter_dir.resolve():
        raise GraftingError(f"output_dir '{output_dir}': is the adapter directory itself; choose another")
    source_config = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    with safe_open(str(reader.file), framework="pt") as fh:
        metadata = fh.metadata() or {}
    entries, positions, signs, scales, raw = [], [], [], [], {}
    for e in reader:
        t = e.tensor
        entry = {"key": e.key, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        if e.role in COMPRESSED_ROLES and t.is_floating_point() and t.numel() >= min_numel:
            if not torch.isfinite(t).all():
                raise GraftingError(f"{reader.file}: tensor '{e.key}' holds NaN or infinite values")
            c = compress_tensor(t, density, scale)
            entry.update(stored="compeft", count=c.count, encoding=c.encoding)
            positions.append(c.positions)
            signs.append(c.signs)
            scales.append(c.scale)
        else:
            entry["stored"] = "raw"
            raw[e.key] = t.contiguous()
        entries.append(entry)
    payload = {POSITIONS: torch.cat(positions) if positions else _u8(b""),
               SIGNS: torch.cat(signs) if signs else _u8(b""),
               SCALES: torch.tensor(scales, dtype=torch.float32), **raw}
    manifest = {"format": FORMAT, "version": VERSION, "density": density, "scale": scale,
                "source_metadata": metadata, "adapter_config": source_config, "tensors": entries}
    with atomic_dir(output_dir) as tmp:
        (tmp / PAYLOAD_NAME).write_bytes(save(payload))
        # compact: on a small adapter the manifest is a sizeable part of the compressed bytes
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, separators=(",", ":")) + "\n", encoding="utf-8")
    original = sum((adapter_dir / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME))
    compressed = sum((output_dir / f).stat().st_size for f in (MANIFEST_NAME, PAYLOAD_NAME))
    return CompressResult(output_dir, density, scale, original, compressed, len(scales), len(raw))


def _manifest(path: Path) -> dict:
    f = path / MANIFEST_NAME
    if not path.is_dir():
        raise GraftingError(f"{path}: not a compressed adapter directory")
    if not f.is_file():
        hint = " (it is an uncompressed adapter: use it as it is)" if (path / CONFIG_NAME).is_file() else ""
        raise GraftingError(f"{f}: missing; a compressed adapter directory holds {MANIFEST_NAME} and "
                            f"{PAYLOAD_NAME}{hint}")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise GraftingError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else None
        raise GraftingError(f"{f}: field 'format' is {found!r}, expected {FORMAT!r} (not a grafting compressed "
                            "adapter)")
    if not isinstance(m.get("version"), int) or isinstance(m["version"], bool) or not 1 <= m["version"] <= VERSION:
        raise GraftingError(f"{f}: field 'version' is {m.get('version')!r}; this grafting reads version "
                            f"{VERSION} (a newer grafting wrote it?)")
    for field, kind in (("adapter_config", dict), ("tensors", list), ("source_metadata", dict)):
        if not isinstance(m.get(field), kind):
            raise GraftingError(f"{f}: field '{field}' is missing or not a JSON {kind.__name__}")
    for i, e in enumerate(m["tensors"]):
        _check_entry(e, f"{f}: tensors[{i}]")
    return m


def _check_entry(e, where: str) -> None:
    if not isinstance(e, dict):
        raise GraftingError(f"{where}: not a JSON object")
    if not isinstance(e.get("key"), str):
        raise GraftingError(f"{where}: field 'key' is missing or not a string")
    where = f"{where} ('{e['key']}')"
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise GraftingError(f"{where}: field 'shape' is {shape!r}, not a list of sizes")
    if e.get("stored") not in ("compeft", "raw"):
        raise GraftingError(f"{where}: field 'stored' is {e.get('stored')!r}, expected 'compeft' or 'raw'")
    if e["stored"] == "raw":
        return
    if e.get("dtype") not in _DTYPES:
        raise GraftingError(f"{where}: field 'dtype' is {e.get('dtype')!r}, expected one of {sorted(_DTYPES)}")
    count = e.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= math.prod(shape):
        raise GraftingError(f"{where}: field 'count' is {count!r}, not in [0, {math.prod(shape)}]")
    if e.get("encoding") not in ENCODINGS:
        raise GraftingError(f"{where}: field 'encoding' is {e.get('encoding')!r}, expected one of {ENCODINGS}")


def read_compressed(compressed_dir) -> tuple[dict, dict]:
    """(manifest, key -> CompressedTensor or raw tensor), in the source's order, every size checked."""
    path = Path(compressed_dir)
    m = _manifest(path)
    f = path / PAYLOAD_NAME
    try:
        with safe_open(str(f), framework="pt") as fh:
            stored = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise GraftingError(f"{f}: missing or not a readable safetensors file ({e})") from None
    for name, dtype in ((POSITIONS, torch.uint8), (SIGNS, torch.uint8), (SCALES, torch.float32)):
        t = stored.get(name)
        if t is None or t.dtype != dtype or t.dim() != 1:
            raise GraftingError(f"{f}: tensor '{name}' is missing or not a 1-D {dtype} tensor")
    compressed = [e for e in m["tensors"] if e["stored"] == "compeft"]
    if stored[SCALES].numel() != len(compressed) or not torch.isfinite(stored[SCALES]).all():
        raise GraftingError(f"{f}: tensor '{SCALES}' holds {stored[SCALES].numel()} values (finite?) for "
                            f"{len(compressed)} compressed tensors in {MANIFEST_NAME}")
    need = [sum(_positions_nbytes(e["encoding"], math.prod(e["shape"]), e["count"]) for e in compressed),
            sum((e["count"] + 7) // 8 for e in compressed)]
    for name, n in zip((POSITIONS, SIGNS), need):
        if stored[name].numel() != n:
            raise GraftingError(f"{f}: tensor '{name}' has {stored[name].numel()} bytes; {MANIFEST_NAME} "
                                f"implies {n} (truncated, or the two files are from different compressions)")
    out, pos_at, sign_at, j = {}, 0, 0, 0
    for e in m["tensors"]:
        key, shape = e["key"], tuple(e["shape"])
        if e["stored"] == "raw":
            t = stored.get(key)
            if t is None or tuple(t.shape) != shape or _dtype_name(t.dtype) != e.get("dtype"):
                raise GraftingError(f"{f}: raw tensor '{key}' is missing or not {e.get('dtype')} of shape "
                                    f"{list(shape)} as {MANIFEST_NAME} says")
            out[key] = t
            continue
        n, count = math.prod(shape), e["count"]
        p = _positions_nbytes(e["encoding"], n, count)
        s = (count + 7) // 8
        c = CompressedTensor(shape, _DTYPES[e["dtype"]], count, e["encoding"],
                             stored[POSITIONS][pos_at:pos_at + p], stored[SIGNS][sign_at:sign_at + s],
                             float(stored[SCALES][j]))
        pos_at, sign_at, j = pos_at + p, sign_at + s, j + 1
        out[key] = c
    return m, out


def decompress(compressed_dir, output_dir) -> Path:
    """Write the PEFT adapter (adapter_config.json + adapter_model.safetensors) that ``compressed_dir`` holds
    into ``output_dir``, atomically; ``peft.PeftModel.from_pretrained`` loads it unchanged."""
    path, output_dir = Path(compressed_dir), Path(output_dir)
    manifest, stored = read_compressed(path)
    if output_dir.resolve() == path.resolve():
        raise GraftingError(f"output_dir '{output_dir}': is the compressed directory itself; choose another")
    where = path / MANIFEST_NAME
    tensors = {k: decompress_tensor(v, f"{where}: '{k}'") if isinstance(v, CompressedTensor) else v
               for k, v in stored.items()}
    metadata = {str(k): str(v) for k, v in manifest["source_metadata"].items()} or {"format": "pt"}
    with atomic_dir(output_dir) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(save(tensors, metadata=metadata))
        (tmp / CONFIG_NAME).write_text(json.dumps(manifest["adapter_config"], indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
        try:  # the config travelled inside our manifest: make sure it is still one an adapter loader accepts
            AdapterReader(tmp)
        except GraftingError as e:
            raise GraftingError(f"{where}: field 'adapter_config' does not make a loadable adapter ({e})") from None
    return output_dir
