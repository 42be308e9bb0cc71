"""Training recipes: one YAML file says model, adapter, data, optimiser, schedule, evaluation and output.

Validated with pydantic at the edge: unknown keys are errors with a did-you-mean, values are type-checked, and
``key=value`` overrides (dotted paths, YAML-typed values) are applied before validation.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import AdapterConfig, config_from_fields
from ..errors import GraftingError


# the first metric of each task is its default
METRICS = {"seq_cls": ("accuracy", "f1", "loss"), "causal_lm": ("perplexity", "loss")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(_Strict):
    path: str = Field(description="local model directory, or packaged:all-minilm-l6-v2 / packaged:smollm2-135m-instruct")
    task: Literal["seq_cls", "causal_lm"] = "seq_cls"
    num_labels: Optional[int] = Field(None, ge=2, description="seq_cls: inferred from the data when omitted")
    gradient_checkpointing: bool = False


class DataSpec(_Strict):
    source: str = Field("files", description="files, or packaged:tweets / packaged:chatterbot / packaged:wordnet-nouns")
    train: Optional[str] = None
    validation: Optional[str] = None
    text_field: str = "text"
    label_field: str = "label"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    labels: Optional[list[str]] = None
    max_length: int = Field(128, ge=8)
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_eval_samples: Optional[int] = Field(None, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    too_long: Literal["truncate", "skip", "error"] = "truncate"
    bad_rows: Literal["error", "skip"] = "error"
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict, description="source-specific options")

    @model_validator(mode="after")
    def _files_need_train(self):
        if self.source == "files" and not self.train:
            raise ValueError("data.train is required when data.source is 'files'")
        return self


class OptimSpec(_Strict):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    head_lr: Optional[float] = Field(None, gt=0, description="learning rate for modules_to_save (default: lr)")
    group_lr: dict[str, float] = Field(default_factory=dict, description="learning rate per parameter role "
                                       "(weights, architecture, saved, shared, bias); default: lr")

    @field_validator("group_lr")
    @classmethod
    def _group_lr_positive(cls, v):
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"learning rates must be > 0, got {bad}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, v):
        # AdamW divides by (1 - beta**step): beta >= 1 gives inf/nan weights, not an error
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got [{v[0]}, {v[1]}]")
        return v


class ScheduleSpec(_Strict):
    name: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class TrainSpec(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    eval_every: Optional[int] = Field(None, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    save_every: Optional[int] = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    metric: Optional[Literal["accuracy", "f1", "loss", "perplexity"]] = Field(
        None, description="default: accuracy for seq_cls, perplexity for causal_lm")
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    seed: int = 0
    bf16: bool = False
    progress: bool = True
    calibration_batches: int = Field(8, ge=1, description="training batches an activation-reading init (EVA, "
                                     "CorDA) sees before training starts")


class BilevelSpec(_Strict):
    """Bi-level training (docs/bilevel.md): the adapter's weights train on the training rows, its architecture
    parameters (AutoLoRA's selection weights, BiLoRA's singular values, DoRA / BiDoRA magnitudes) on the outer
    rows through the hypergradient."""

    hypergradient: Literal["first_order", "darts", "neumann", "cg", "unrolled"] = "darts"
    unroll: int = Field(1, ge=1, description="inner steps per outer step")
    warmup_steps: int = Field(0, ge=0, description="inner-only steps before the first outer step")
    outer_lr: float = Field(1e-2, gt=0)
    outer_optim: Literal["adamw", "sgd"] = "adamw"
    outer_weight_decay: float = Field(0.0, ge=0)
    outer_data: Literal["split", "validation"] = Field(
        "split", description="split: a held-out part of the training rows (outer_fraction); validation: "
                             "data.validation (then the reported validation scores are not held out)")
    outer_fraction: float = Field(0.2, gt=0, lt=1)
    outer_batch_size: Optional[int] = Field(None, ge=1, description="default: train.batch_size")
    retrain_steps: Optional[int] = Field(None, ge=1, description="AutoLoRA: steps of the final plain-LoRA "
                                         "retraining at the found ranks (default: as many as the search took)")
    iters: int = Field(5, ge=1, description="Neumann terms / CG iterations")
    alpha: Optional[float] = Field(None, gt=0, description="DARTS / Neumann / unrolled step; default: inner lr")
    eps: float = Field(0.01, gt=0, description="DARTS finite-difference radius")


class QuantizeSpec(_Strict):
    """Train on a frozen NF4 base (QLoRA; docs/quantization.md): the model is quantized after loading, and the
    adapter initialised for it (init: qlora = zero-start as the adapter config says; loftq / lq_lora: fitted
    to the quantization error, the base then saved beside the adapter in output_dir/base)."""

    init: Literal["qlora", "loftq", "lq_lora"] = "qlora"
    block_size: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: bool = True
    num_iter: Optional[int] = Field(None, ge=1, description="LoftQ / LQ-LoRA iterations (default 5 / 20)")
    bits_per_parameter: Optional[float] = Field(None, gt=2, description="LQ-LoRA: memory budget over the target "
                                                "layers, met with a (bits, block size) per matrix: NormalFloat at "
                                                "2, 3, 4 or 8 bits")
    nf4_only: bool = Field(False, description="LQ-LoRA's budget over NF4 block sizes only, so the base stays a "
                           "bitsandbytes checkpoint")
    embeddings: bool = Field(False, description="the input embedding and output head in NF4 too (grafting's "
                             "extension; the base then cannot be saved as a bitsandbytes checkpoint)")

    @model_validator(mode="after")
    def _budget_is_lq_lora(self):
        if self.nf4_only and self.bits_per_parameter is None:
            raise ValueError("quantize.nf4_only restricts LQ-LoRA's budget: set quantize.bits_per_parameter too")
        if self.bits_per_parameter is not None and self.init != "lq_lora":
            raise ValueError("quantize.bits_per_parameter is LQ-LoRA's budget: set quantize.init to lq_lora")
        if self.embeddings and self.init != "qlora":
            raise ValueError("quantize.embeddings: LoftQ / LQ-LoRA save their base as a bitsandbytes checkpoint, "
                             "which cannot hold NF4 embeddings; use init qlora")
        return self


class Recipe(_Strict):
    model: ModelSpec
    adapter: dict[str, Any]
    data: DataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    bilevel: Optional[BilevelSpec] = None
    quantize: Optional[QuantizeSpec] = None
    output_dir: str = "runs/grafting"

    @field_validator("adapter")
    @classmethod
    def _adapter_is_a_method_config(cls, v):
        # adapter.method names a registered method (default lora); the other keys are that config's fields
        try:
            config_from_fields(v, where="adapter")
        except GraftingError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _metric_fits_task(self):
        allowed = METRICS[self.model.task]
        if self.train.metric is None:
            self.train.metric = allowed[0]
        elif self.train.metric not in allowed:
            # caught here, not when the final evaluation has no such score and the run is lost
            raise ValueError(f"train.metric '{self.train.metric}' is not measured for model.task "
                             f"'{self.model.task}' (expected one of {', '.join(allowed)})")
        if self.model.num_labels is not None and self.model.task != "seq_cls":
            raise ValueError(f"model.num_labels is for model.task 'seq_cls' (this recipe's task is "
                             f"'{self.model.task}'); remove it")
        return self

    def adapter_config(self) -> AdapterConfig:
        return config_from_fields(self.adapter, where="adapter")


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = inner[0] if inner else ann  # Optional[Section]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _explain(e: ValidationError, where: str) -> GraftingError:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(Recipe, loc), n=1)
            hint = f" (did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?)" if close else ""
            lines.append(f"unknown key '{dotted}'{hint}")
        elif not loc and err["type"] == "value_error":  # a check across sections names its own fields
            lines.append(str(err["ctx"]["error"]))
        else:
            lines.append(f"'{dotted}': {err['msg']}")
    return GraftingError(f"{where}: invalid recipe:\n  " + "\n  ".join(lines))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``train.batch_size=8`` style overrides; values are parsed as YAML (numbers, lists, booleans)."""
    for item in overrides:
        if "=" not in item:
            raise GraftingError(f"override '{item}' must look like key=value (e.g. train.max_steps=10)")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GraftingError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise GraftingError(f"override '{item}': the value is not valid YAML ({_one_line(e)}); "
                                "quote it if it is meant as text") from None
    return raw


def load_recipe(source: Union[str, Path, dict, Recipe], overrides: Optional[list[str]] = None) -> Recipe:
    if isinstance(source, Recipe):
        if not overrides:
            return source
        source = source.model_dump()
    where = "recipe"
    if isinstance(source, (str, Path)):
        where = str(source)
        if Path(source).is_dir():
            raise GraftingError(f"{source}: is a directory; a recipe is a YAML file (see examples/)")
        try:
            raw = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GraftingError(f"{source}: recipe file not found") from None
        except UnicodeDecodeError as e:
            raise GraftingError(f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); save the recipe "
                                "as UTF-8") from None
        except yaml.YAMLError as e:
            raise GraftingError(f"{source}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise GraftingError(f"{source}: a recipe is a YAML mapping with model, adapter, data, ... sections")
    else:
        raw = copy.deepcopy(dict(source))  # overrides write into nested sections: never the caller's
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, where) from None
