"""The streaming merge driver: a mergekit config in, a merged model directory out, one tensor at a time.

Everything that can be checked without reading a tensor is checked first: the config (see :mod:`.config`),
that every input has the same tensor names and shapes, and every parameter's value for every tensor. Then, per
tensor name, each input's tensor is read, upcast to float32, merged by the method (which may work in the
tensors it is handed: they are read for it alone), cast to the output dtype and written straight to its shard
(:mod:`.shards`); nothing else is kept, so peak memory is about (inputs + 2) x the largest tensor. The output is written into a temporary directory beside ``output_dir`` and renamed into place
only when everything succeeded, with config.json, generation_config.json and the tokenizer, so it loads with
``transformers`` like any checkpoint.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GraftingError
from ..io.atomic import atomic_dir
from .base import ModelTensor, TensorGroup, tensor_generator
from .io import MergeInput, layer_index, num_layers, open_input
from .shards import ShardWriter

DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes; mergekit's default "5B"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


@dataclass
class MergeResult:
    output_dir: Path
    method: str
    tensors: int
    bytes_written: int  # every file of the output, weights and the copied config/tokenizer files
    seconds: float
    files: list[str] = field(default_factory=list)
    adapter: object = None  # adapter outputs: the AdapterMergeResult (ranks, exactness, energy kept per module)


@dataclass
class _Planned:
    name: str
    layer: int | None
    global_params: dict
    model_params: list[dict]


def merge(config, output_dir, *, seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
          copy_tokenizer: bool = True) -> MergeResult:
    """Run a mergekit-style merge config and write the merged model to ``output_dir``.

    ``config``: a YAML path, the parsed YAML as a dict, or a :class:`~grafting.merge.config.MergeConfig`.
    ``seed`` makes random methods (DARE, DELLA) reproducible, per tensor and independent of order.
    ``shard_size``: the most bytes per output file. ``output_dir`` must not exist or be empty."""
    start = time.perf_counter()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise GraftingError(f"shard_size must be a positive number of bytes, got {shard_size!r}")
    from .config import load_config  # needs pydantic: its absence is a GraftingError naming the extra

    cfg = load_config(config)
    bound = cfg.bound()
    out = Path(output_dir)
    _check_output(out, bound)
    if _output_kind(cfg, bound) == "adapter":
        return _merge_into_adapter(cfg, bound, out, seed, progress, start)
    opened: dict[Path, MergeInput] = {}
    labels: dict[Path, str] = {}
    try:
        for path in dict.fromkeys([bound.donor, *([bound.base] if bound.base else []), *bound.inputs]):
            labels[path] = _label(bound, path)
            # the donor is base_model when there is one: what an adapter input would apply to
            opened[path] = open_input(path, label=labels[path], base=opened.get(bound.donor))
        donor = opened[bound.donor]
        _check_same_tensors(bound.donor, opened, labels)
        plan, n_layers = _plan(bound, donor)
        _warn_mixed_dtypes(opened, labels, donor.names())
        base = opened[bound.base] if bound.base else None
        models = [(opened[p], labels[p]) for p in bound.inputs]
        with atomic_dir(out) as tmp:
            layout = [(item.name, donor.shape(item.name), _out_dtype(bound, donor, item.name)) for item in plan]
            writer = ShardWriter(tmp, layout, shard_size, metadata={"merge_method": bound.method.name})
            bar = _bar(len(plan), f"merge {bound.method.name}", progress)
            try:
                for item in plan:
                    tensor = _merge_one(item, bound, base, models, (donor, labels[bound.donor]), n_layers, seed)
                    writer.add(item.name, tensor)  # on disk now: nothing holds it after this line
                    del tensor
                    bar.update(1)
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
            files = [f.name for f in writer.finish()]
            files += _copy_support(bound, opened, tmp, copy_tokenizer)
            written = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    finally:
        for inp in opened.values():
            close = getattr(inp, "close", None)
            if close:
                close()
    return MergeResult(out, bound.method.name, len(plan), written, time.perf_counter() - start, sorted(files))


def _output_kind(cfg, bound) -> str:
    """"adapter" or "model": what ``output.kind`` says, else adapter when every listed model is an adapter."""
    from .adapters import is_adapter_dir

    spec = cfg.output
    kind = spec.kind if spec is not None else None
    if kind not in (None, "adapter", "model"):
        raise GraftingError(f"{cfg.source}: output.kind: expected 'adapter' or 'model', got {kind!r}")
    if spec is not None:
        if spec.rank is not None and spec.energy is not None:
            raise GraftingError(f"{cfg.source}: output: give rank or energy, not both")
        if spec.rank is not None and spec.rank < 1:
            raise GraftingError(f"{cfg.source}: output.rank: expected an integer >= 1, got {spec.rank}")
        if spec.energy is not None and not 0 < spec.energy <= 1:
            raise GraftingError(f"{cfg.source}: output.energy: expected a fraction in (0, 1], got {spec.energy}")
    adapters = [is_adapter_dir(p) for p in _listed_inputs(bound)]
    if kind is None:
        kind = "adapter" if adapters and all(adapters) else "model"
    if kind == "adapter" and not all(adapters):
        first = next(lab for lab, a in zip(bound.labels, adapters) if not a)
        raise GraftingError(f"{cfg.source}: output.kind: adapter needs every models entry to be an adapter "
                            f"directory; '{first}' is a full model")
    if kind == "model" and spec is not None and (spec.rank is not None or spec.energy is not None):
        raise GraftingError(f"{cfg.source}: output.rank / output.energy apply to adapter outputs only")
    return kind


def _listed_inputs(bound) -> list[Path]:
    """The inputs listed under models: without the base that mergekit appends for a method giving it no role."""
    if bound.base is None and bound.config.base_model is not None and len(bound.inputs) > len(bound.config.models):
        return list(bound.inputs[:-1])
    return list(bound.inputs)


def _merge_into_adapter(cfg, bound, out: Path, seed: int, progress: bool, start: float) -> MergeResult:
    """Adapters in, one adapter out (see :func:`grafting.merge.adapters.merge_adapters`)."""
    from .adapters import merge_adapters

    inputs = _listed_inputs(bound)
    # with a base_model the donor is it (for methods without a base role too)
    base = open_input(bound.donor, label="base_model") if bound.config.base_model is not None else None
    n_layers = num_layers(base.config) if base is not None else None
    if n_layers is None:  # no base config: the depth of the stack is what the adapters themselves adapt
        from ..io.reader import AdapterReader
        seen = [layer_index(m + ".") for p in inputs for m in AdapterReader(p).modules()]
        n_layers = max([x for x in seen if x is not None], default=-1) + 1 or None

    def resolve(name: str):
        layer = layer_index(name)
        t = layer / (n_layers - 1) if layer is not None and n_layers and n_layers > 1 else 0.0
        return ([bound.model_params(i, name, t) for i in range(len(inputs))], bound.global_params(name, t))

    spec = cfg.output
    try:
        res = merge_adapters(inputs, bound.method.name, out, resolve=resolve, base=base,
                             rank=spec.rank if spec else None, energy=spec.energy if spec else None, seed=seed,
                             dtype=bound.out_dtype or bound.dtype, progress=progress)
    finally:
        if base is not None and getattr(base, "close", None):
            base.close()
    files = sorted(f.name for f in out.iterdir())
    written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return MergeResult(out, bound.method.name, 2 * len(res.ranks), written, time.perf_counter() - start, files,
                       adapter=res)


def _label(bound, path: Path) -> str:
    """How the config names ``path``, so messages and ModelTensor.model use the user's words."""
    for p, lab in zip(bound.inputs, bound.labels):
        if p == path:
            return lab
    base_ref = bound.config.base_model
    return base_ref if path == bound.donor and isinstance(base_ref, str) else str(path)


def _check_output(out: Path, bound) -> None:
    resolved = out.resolve()
    for path in [bound.donor, *bound.inputs]:
        if resolved == path:
            raise GraftingError(f"output directory {out} is one of the inputs")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GraftingError(f"output directory {out} exists and is not empty; merge writes a new directory "
                            f"(remove it or choose another)")


def _check_same_tensors(ref_path: Path, opened: dict, labels: dict) -> None:
    """Every input must hold the same tensor names with the same shapes; name the first that differs."""
    ref, ref_label = opened[ref_path], labels[ref_path]
    ref_names = ref.names()
    ref_set = set(ref_names)
    for path, other in opened.items():
        if path == ref_path:
            continue
        names, label = other.names(), labels[path]
        have = set(names)
        missing = [n for n in ref_names if n not in have]
        if missing:
            raise GraftingError(f"tensor '{missing[0]}' is in {ref_label} but not in {label}"
                                + (f" ({len(missing)} tensors missing)" if len(missing) > 1 else ""))
        extra = [n for n in names if n not in ref_set]
        if extra:
            raise GraftingError(f"tensor '{extra[0]}' is in {label} but not in {ref_label}"
                                + (f" ({len(extra)} extra tensors)" if len(extra) > 1 else ""))
        for n in ref_names:
            if tuple(other.shape(n)) != tuple(ref.shape(n)):
                raise GraftingError(f"tensor '{n}' has shape {tuple(ref.shape(n))} in {ref_label} but "
                                    f"{tuple(other.shape(n))} in {label}")


def _plan(bound, donor: MergeInput) -> tuple[list[_Planned], int | None]:
    """Every tensor's layer and resolved parameters, so a missing value fails before any tensor is read."""
    names = donor.names()
    layers = {n: layer_index(n) for n in names}
    seen = [i for i in layers.values() if i is not None]
    # a config that undercounts its blocks would put t past 1 and extrapolate the gradients
    n_layers = max([num_layers(donor.config) or 0] + [i + 1 for i in seen]) or None
    plan = []
    for name in names:
        layer = layers[name]
        # where mergekit evaluates gradients: 0 outside the block stack, layer / (n - 1) inside it
        t = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
        plan.append(_Planned(name, layer, bound.global_params(name, t),
                             [bound.model_params(i, name, t) for i in range(len(bound.inputs))]))
    return plan, n_layers


def _warn_mixed_dtypes(opened: dict, labels: dict, names: list[str]) -> None:
    for name in names:
        kinds = {labels[p]: inp.dtype(name) for p, inp in opened.items()}
        if len(set(kinds.values())) > 1:
            listed = ", ".join(f"{lab}: {str(d).removeprefix('torch.')}" for lab, d in kinds.items())
            warnings.warn(f"inputs differ in dtype (e.g. '{name}': {listed}); every tensor is upcast to float32 "
                          f"for the merge", stacklevel=3)
            return


def _out_dtype(bound, donor: MergeInput, name: str) -> torch.dtype:
    stored = donor.dtype(name)
    # integer buffers are copied from the donor as they are
    return (bound.out_dtype or bound.dtype or stored) if stored.is_floating_point else stored


def _merge_one(item: _Planned, bound, base, models, donor_labelled, n_layers, seed) -> torch.Tensor:
    name = item.name
    donor, donor_label = donor_labelled
    out_dtype = _out_dtype(bound, donor, name)
    if not donor.dtype(name).is_floating_point:
        # integer buffers (position ids, masks) are not weights: keep the donor's, as they must all agree
        kept = donor.get(name)
        for inp in [*([base] if base else []), *(m for m, _ in models)]:
            if inp is not donor and not torch.equal(inp.get(name), kept):
                warnings.warn(f"'{name}' is not floating point and differs between inputs; the output keeps "
                              f"{donor_label}'s", stacklevel=3)
                break
        return kept

    def load(inp: MergeInput) -> torch.Tensor:
        x = inp.get(name)
        if bound.dtype is not None:  # mergekit computes in ``dtype``: round the inputs to it as it does
            x = x.to(bound.dtype)
        return x.float()

    group = TensorGroup(
        name=name,
        models=[ModelTensor(label, load(m), params) for (m, label), params in zip(models, item.model_params)],
        base=load(base) if base is not None else None,
        layer=item.layer, num_layers=n_layers if item.layer is not None else None,
        generator=tensor_generator(seed, name),
        owned=True,  # MergeInput.get returns a new buffer per call: the method may overwrite these
    )
    try:
        result = bound.method(group, item.global_params)
    except GraftingError:
        raise
    except Exception as e:
        e.add_note(f"while merging tensor '{name}' with merge_method '{bound.method.name}'")
        raise
    shape = tuple(donor.shape(name))
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != shape:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise GraftingError(f"merge_method '{bound.method.name}' returned {got} for '{name}', expected shape {shape}")
    return result.to(out_dtype)


def _bar(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)
        except ModuleNotFoundError:
            warnings.warn("tqdm is not installed: no progress bar", stacklevel=3)

    class _Silent:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Silent()


def _digest(directory: Path) -> str | None:
    h = hashlib.sha256()
    found = False
    for fname in VOCAB_FILES:
        f = directory / fname
        if f.is_file():
            found = True
            h.update(fname.encode() + b"\0" + f.read_bytes())
    return h.hexdigest() if found else None


def _copy_support(bound, opened: dict, tmp: Path, copy_tokenizer: bool) -> list[str]:
    """config.json (dtype updated), generation_config.json, the tokenizer, and the config that made the merge."""
    written = []
    donor_dir = bound.donor if bound.donor.is_dir() else None
    if donor_dir and (donor_dir / "config.json").is_file():
        cfg = json.loads((donor_dir / "config.json").read_text(encoding="utf-8"))
        chosen = bound.out_dtype or bound.dtype
        if chosen is not None:
            name = str(chosen).removeprefix("torch.")
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        written.append("config.json")
    if donor_dir and (donor_dir / "generation_config.json").is_file():
        shutil.copyfile(donor_dir / "generation_config.json", tmp / "generation_config.json")
        written.append("generation_config.json")
    (tmp / "mergekit_config.yml").write_text(bound.config.text, encoding="utf-8")
    written.append("mergekit_config.yml")
    if not copy_tokenizer:
        if bound.chat_template:
            warnings.warn("chat_template is set but the tokenizer is not copied: the template is not saved",
                          stacklevel=3)
        return written
    source = bound.tokenizer_source or bound.donor
    if not source.is_dir():
        return written
    ours = _digest(source)
    for path in opened:
        if path.is_dir() and path != source:
            theirs = _digest(path)
            if ours and theirs and theirs != ours:
                warnings.warn(f"the tokenizer of {path} differs from {source}'s, which is copied; embeddings are "
                              f"merged row by row as stored, not re-aligned to one vocabulary", stacklevel=3)
                break
    for fname in TOKENIZER_FILES:
        if (source / fname).is_file():
            shutil.copyfile(source / fname, tmp / fname)
            written.append(fname)
    if bound.chat_template:
        written += _write_chat_template(bound, list(opened), tmp, written)
    return written


def _template_of(directory: Path) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        value = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _write_chat_template(bound, paths: list[Path], tmp: Path, written: list[str]) -> list[str]:
    template = bound.chat_template
    if template == "auto":  # the template most inputs share, as mergekit picks it
        found = [t.strip() for t in (_template_of(p) for p in paths if p.is_dir()) if t]
        if not found:
            warnings.warn("chat_template: auto, but no input has a chat template", stacklevel=4)
            return []
        template = collections.Counter(found).most_common(1)[0][0]
    tok_cfg = tmp / "tokenizer_config.json"
    if tok_cfg.is_file():  # the jinja file is the one template: drop a copied inline one so they cannot disagree
        data = json.loads(tok_cfg.read_text(encoding="utf-8"))
        if data.pop("chat_template", None) is not None:
            tok_cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
    return [] if "chat_template.jinja" in written else ["chat_template.jinja"]
