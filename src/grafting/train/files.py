"""Reading a local data file into records, keeping each record's line number (Parquet: row index).

Hugging Face ``datasets`` does the parsing, but it stops at the first malformed line and forgets where each
record came from. JSON Lines and CSV files are therefore scanned first: broken lines are collected as problems
(reported or skipped by the caller), the loader reads a copy without them, and every record keeps the line it
starts on.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

from ..errors import GraftingError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_records(shown: str, field: str) -> tuple[list[dict], list[int], str, list[tuple[int, str]]]:
    """(records, their line numbers or row indices, "" or "row ", problems found before loading)."""
    path = Path(shown)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise GraftingError(f"{field} '{shown}': unknown file type '{path.suffix}' "
                            f"(expected one of {', '.join(FORMATS)})")
    if not path.is_file():
        raise GraftingError(f"{field} '{shown}': file not found")
    unit, lines, problems, clean = "", [], [], None
    try:
        if fmt == "json":
            lines, problems, clean = _scan_jsonl(path)
        elif fmt == "csv":
            lines, problems, clean = _scan_csv(path, shown)
    except UnicodeDecodeError as e:
        raise GraftingError(f"{field} '{shown}': not UTF-8 text ({e})") from None
    if fmt != "parquet" and not lines:
        return [], [], unit, problems  # nothing readable: the loader would fail with a less useful message
    with tempfile.TemporaryDirectory() as tmp:
        source, cache = path, None
        if problems:
            # the loader would stop at the first broken line: it reads a copy without them, and the
            # broken lines are reported (or skipped) with the rest
            source, cache = Path(tmp) / f"clean{path.suffix}", tmp
            clean(source)
        records = _load_dataset(fmt, source, cache, shown, field)
    if fmt == "parquet" or len(records) != len(lines):
        # Parquet has no lines; a count mismatch would mean the CSV dialects disagree, and a row index is
        # then the honest position
        unit, lines = "row ", list(range(len(records)))
    return records, lines, unit, problems


def _scan_jsonl(path: Path):
    lines, problems, kept = [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                # without the newline, an unclosed object is reported at its own end, not at column 1
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                problems.append((line_no, f"not valid JSON ({e.msg}, column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                problems.append((line_no, f"not a JSON object (one object per line; got {type(obj).__name__})"))
                continue
            lines.append(line_no)
            kept.append(text if text.endswith("\n") else text + "\n")

    def clean(target: Path):
        target.write_text("".join(kept), encoding="utf-8")
    return lines, problems, clean


def _scan_csv(path: Path, shown: str):
    lines, problems, kept = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: report where the row starts
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise GraftingError(f"{shown}:{start}: not valid CSV ({e})") from None
            if not row:  # blank line; the loader skips these too, so counts stay aligned
                continue
            if len(row) != len(header):
                problems.append((start, f"{len(row)} field(s) where the header has {len(header)}"))
                continue
            lines.append(start)
            kept.append(row)

    def clean(target: Path):
        with open(target, "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(header)
            writer.writerows(kept)
    return lines, problems, clean


def _load_dataset(fmt: str, path: Path, cache: str | None, shown: str, field: str) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    # without keep_default_na, pandas turns texts such as "NA" or "null" into missing values
    kwargs = {"keep_default_na": False} if fmt == "csv" else {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache, **kwargs)
    except Exception as e:  # any loader failure is about this user file
        raise GraftingError(f"{field} '{shown}': could not be read as {fmt} ({type(e).__name__}: {e})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return ds.to_list()
