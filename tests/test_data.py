"""Tokenizer, built-in corpora, local files and packing."""

from __future__ import annotations

import json
import random
import re

import pytest
from datasets import Dataset

from tto.data import builtin_documents, load_documents, load_tokenizer, pack_documents


def test_byte_tokenizer_ids_are_bytes_and_round_trip(tmp_path):
    tok = load_tokenizer("builtin:bytes")
    text = "Aé\n✓ tabs\tand emoji 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [4 + b for b in text.encode()]
    assert tok.decode(ids) == text
    assert len(tok) == 260 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))(text, add_special_tokens=False)["input_ids"] == ids


def test_unknown_builtins_are_named():
    with pytest.raises(ValueError, match="builtin:bytes"):
        load_tokenizer("builtin:bites")
    with pytest.raises(ValueError, match="did you mean 'builtin:pydoc'"):
        builtin_documents("builtin:pydocs")


def test_pydoc_is_english_prose():
    docs = builtin_documents("builtin:pydoc")
    assert len(docs) > 50 and sum(map(len, docs)) > 400_000
    assert any("assert" in d for d in docs)


def test_recall_documents_ask_back_every_unique_key():
    docs = builtin_documents("builtin:recall", num_documents=20, pairs=6, seed=3)
    assert docs == builtin_documents("builtin:recall", num_documents=20, pairs=6, seed=3)
    for doc in docs:
        written, asked = doc.split(" | ")
        table = dict(pair.split("=") for pair in written.split())
        assert len(table) == 6  # keys unique within a document
        assert dict(pair.split("=") for pair in asked.split()) == table


def test_passkey_appears_once_and_is_asked_for():
    for doc in builtin_documents("builtin:passkey", num_documents=20, seed=1):
        keys = re.findall(r"The pass key is (\d{5})\. Remember it", doc)
        assert len(keys) == 1
        assert doc.endswith(f"What is the pass key? The pass key is {keys[0]}.")


def test_packing_fills_every_block_with_eos_separators():
    tok = load_tokenizer("builtin:bytes")
    ds = Dataset.from_dict({"text": ["ab", "cde", "fghij"]})
    packed = pack_documents(ds, tok, max_seq_length=4)
    eos = tok.eos_token_id
    flat = [4 + ord(c) for c in "ab"] + [eos] + [4 + ord(c) for c in "cde"] + [eos] + [4 + ord(c) for c in "fghij"] + [eos]
    assert packed["input_ids"] == [flat[0:4], flat[4:8], flat[8:12]]
    assert packed["labels"] == packed["input_ids"]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet", "glob", "saved"])
def test_local_sources(fmt, tmp_path):
    texts = ["first document", "second one"]
    ds = Dataset.from_dict({"text": texts})
    if fmt == "txt":
        (tmp_path / "a.txt").write_text("\n".join(texts))
        name = str(tmp_path / "a.txt")
    elif fmt == "jsonl":
        (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
        name = str(tmp_path / "a.jsonl")
    elif fmt == "csv":
        ds.to_csv(str(tmp_path / "a.csv"))
        name = str(tmp_path / "a.csv")
    elif fmt == "parquet":
        ds.to_parquet(str(tmp_path / "a.parquet"))
        name = str(tmp_path / "a.parquet")
    elif fmt == "glob":
        for i, t in enumerate(texts):
            (tmp_path / f"part{i}.txt").write_text(t)
        name = str(tmp_path / "part*.txt")
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        name = str(tmp_path / "saved")
    loaded = load_documents(name)
    assert loaded.column_names == ["text"]
    assert sorted(loaded["text"]) == sorted(texts)


def test_missing_text_column_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="no column 'text'.*body"):
        load_documents(str(tmp_path / "a.jsonl"))


def test_missing_local_path_is_not_taken_for_a_hub_name(tmp_path):
    for name in (str(tmp_path / "nope.jsonl"), str(tmp_path / "*.txt"), "data/train.parquet"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            load_documents(name)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_tokenizer(str(tmp_path / "tok"))


# --- answer spans (dataset.loss_on: answers) and one document per block (dataset.packing: false) ---

def test_recall_answers_are_the_asked_values_and_texts_are_unchanged():
    from tto.data.corpora import recall_documents, recall_marked

    marked = recall_marked(num_documents=30, pairs=5, key_length=2, value_digits=3, seed=4)
    assert [t for t, _ in marked] == recall_documents(num_documents=30, pairs=5, key_length=2, value_digits=3, seed=4)
    for text, spans in marked:
        written, asked = text.split(" | ")
        table = dict(pair.split("=") for pair in written.split())
        at = len(written) + len(" | ")
        expected = []
        for pair in asked.split(" "):  # each asked value starts after its "key="
            key = pair.split("=")[0]
            expected.append((at + len(key) + 1, at + len(pair)))
            assert pair == f"{key}={table[key]}"
            at += len(pair) + 1
        assert spans == expected
        assert [text[s:e] for s, e in spans] == [table[p.split("=")[0]] for p in asked.split(" ")]


def test_passkey_answer_is_the_key_after_the_question():
    from tto.data.corpora import passkey_marked

    for text, spans in passkey_marked(num_documents=20, filler_repeats=2, seed=5):
        key = re.search(r"The pass key is (\d{5})\. Remember it", text).group(1)
        assert spans == [(len(text) - len(key) - 1, len(text) - 1)] and text[spans[0][0] : spans[0][1]] == key


def test_passkey_prompt_length_hides_the_key_once_at_every_sentence_start():
    from tto.data.corpora import FILLER, PASSKEY_QUESTION, passkey_marked

    needle = re.compile(r"The pass key is (\d{5})\. Remember it\. ")
    sentences = [s + ". " for s in FILLER.split(". ") if s.strip(". ")]
    depths, fillers = set(), set()
    for text, spans in passkey_marked(num_documents=300, seed=2, prompt_length=200):
        (found,) = needle.finditer(text)  # the key is written exactly once
        key = found.group(1)
        assert spans == [(200, 205)] and text[200:205] == key and text[:200].endswith(PASSKEY_QUESTION)
        hay = text[: found.start()] + text[found.end() : 200 - len(PASSKEY_QUESTION)]
        assert hay in FILLER * 3 and hay.endswith(". ")  # whole filler sentences, cut at the start only
        # the needle sits where a sentence starts (or at the very start)
        assert found.start() == 0 or any(text[found.end() :].startswith(s) for s in sentences + [PASSKEY_QUESTION])
        assert found.start() == 0 or text[: found.start()].endswith(". ")
        depths.add(found.start() / len(hay))
        fillers.add(hay)
    assert min(depths) == 0 and max(depths) == 1
    assert all(any(lo <= d < lo + 0.25 for d in depths) for lo in (0, 0.25, 0.5, 0.75))  # every quarter
    assert len(fillers) > 1  # the filler starts at a random sentence (a fixed start gives one filler)


def test_passkey_prompt_length_builds_niahs_prompts():
    from tto.data.corpora import FILLER, passkey_marked
    from tto.eval.base import SentenceStream
    from tto.eval.niah import niah_example

    class Bytes:  # encodes as eval's LM does with the builtin:bytes tokenizer
        tok = load_tokenizer("builtin:bytes")

        def encode(self, text):
            return self.tok(text, add_special_tokens=False)["input_ids"]

    no_key = lambda text: re.sub(r"\d{5}", "NNNNN", text)  # noqa: E731
    corpus = {no_key(text[:start]) for text, [(start, _)] in passkey_marked(num_documents=2000, prompt_length=164)}
    stream = SentenceStream.from_texts(Bytes(), [FILLER])
    for i, depth in enumerate([0.0, 0.25, 0.5, 0.75, 1.0] * 4):
        e = niah_example(Bytes(), stream, "passkey", 164, depth, random.Random(i))
        assert no_key(Bytes.tok.decode(e.ids[: e.prompt_length])) in corpus


def test_passkey_prompt_length_range_draws_every_length_per_document():
    """[min, max]: each document's prompt (filler, needle, question) is some N in min..max, every N
    occurs, and the key follows the question; a fixed length leaves the documents as they were."""
    from tto.data.corpora import PASSKEY_QUESTION, passkey_marked

    lengths = set()
    for text, [(start, end)] in passkey_marked(num_documents=400, seed=3, prompt_length=[150, 159]):
        assert text[:start].endswith(PASSKEY_QUESTION) and text[start:end].isdigit() and text[end:] == "."
        assert len(re.findall(r"The pass key is \d{5}\. Remember it\. ", text[:start])) == 1
        lengths.add(start)
    assert lengths == set(range(150, 160))
    assert passkey_marked(num_documents=5, seed=3, prompt_length=[164, 164]) == passkey_marked(
        num_documents=5, seed=3, prompt_length=164)


@pytest.mark.parametrize("prompt_length, message", [
    ([164], r"prompt_length=\[164\]: a positive count or \[min, max\]"),
    ([200, 100], r"prompt_length=\[200, 100\]: a positive count or \[min, max\] with 1 <= min <= max"),
    ([50, 200], "prompt_length=50: the needle and the question alone take 74"),
])
def test_passkey_prompt_length_range_errors(prompt_length, message):
    with pytest.raises(ValueError, match=message):
        builtin_documents("builtin:passkey", num_documents=1, prompt_length=prompt_length)


def test_passkey_prompt_length_too_short_for_the_question_is_named():
    with pytest.raises(ValueError, match="prompt_length=50: the needle and the question alone take 74"):
        builtin_documents("builtin:passkey", num_documents=1, prompt_length=50)


def test_recall_pairs_range_draws_every_count_in_it():
    docs = builtin_documents("builtin:recall", num_documents=200, pairs=[2, 5], key_length=1, value_digits=1, seed=0)
    counts = {len(doc.split(" | ")[0].split()) for doc in docs}
    assert counts == {2, 3, 4, 5}
    for bad in (0, [3, 2], [1], [0, 2], "4"):
        with pytest.raises(ValueError, match="a positive count or \\[min, max\\]"):
            builtin_documents("builtin:recall", num_documents=1, pairs=bad)
    with pytest.raises(ValueError, match="more than the 26 distinct keys of 1 letters"):
        builtin_documents("builtin:recall", num_documents=1, pairs=[2, 27], key_length=1)


def ids_of(text: str) -> list[int]:
    return [4 + b for b in text.encode()]  # the byte tokenizer: byte b is id 4 + b


def test_loss_on_answers_labels_only_the_answer_tokens():
    tok = load_tokenizer("builtin:bytes")
    eos, ignore = tok.eos_token_id, -100
    # "é" is two bytes, so a character span covers two tokens
    ds = Dataset.from_dict({"text": ["ab=12 cd=é", "x=9"], "answers": [[[3, 5], [9, 10]], [[2, 3]]]})
    packed = pack_documents(ds, tok, max_seq_length=5, loss_on="answers")
    flat_ids = ids_of("ab=12 cd=é") + [eos] + ids_of("x=9") + [eos]
    flat_labels = ([ignore] * 3 + ids_of("12") + [ignore] * 4 + ids_of("é") + [ignore]
                   + [ignore] * 2 + ids_of("9") + [ignore])
    assert packed["input_ids"] == [flat_ids[0:5], flat_ids[5:10], flat_ids[10:15]]
    assert packed["labels"] == [flat_labels[0:5], flat_labels[5:10], flat_labels[10:15]]


def test_one_document_per_block_is_padded_and_masked():
    tok = load_tokenizer("builtin:bytes")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ds = Dataset.from_dict({"text": ["ab=1", "c=23"], "answers": [[[3, 4]], [[2, 4]]]})
    blocks = pack_documents(ds, tok, max_seq_length=7, loss_on="answers", packing=False)
    assert blocks["input_ids"] == [ids_of("ab=1") + [eos, pad, pad], ids_of("c=23") + [eos, pad, pad]]
    assert blocks["labels"] == [[-100] * 3 + ids_of("1") + [-100] * 3, [-100] * 2 + ids_of("23") + [-100] * 3]
    assert blocks["attention_mask"] == [[1] * 5 + [0] * 2] * 2
    whole = pack_documents(Dataset.from_dict({"text": ["ab"]}), tok, max_seq_length=4, packing=False)
    assert whole["labels"] == [ids_of("ab") + [eos, -100]]  # loss_on=all: every real token, EOS included
    with pytest.raises(ValueError, match="a document of 5 tokens .* longer than max_seq_length=4"):
        pack_documents(ds, tok, max_seq_length=4, packing=False)


@pytest.mark.parametrize("spans, problem", [([[2, 1]], "\\[2, 1\\]"), ([[0, 2], [1, 3]], "\\[1, 3\\]"),
                                            ([[3, 9]], "\\[3, 9\\]"), ([[1, 1]], "\\[1, 1\\]")])
def test_bad_answer_spans_are_named(spans, problem):
    tok = load_tokenizer("builtin:bytes")
    with pytest.raises(ValueError, match=f"must be non-empty, in order, not overlapping and inside the text; {problem}"):
        pack_documents(Dataset.from_dict({"text": ["abcd"], "answers": [spans]}), tok, 8, loss_on="answers")


def test_loss_on_answers_needs_marked_documents():
    tok = load_tokenizer("builtin:bytes")
    with pytest.raises(ValueError, match="needs documents with an 'answers' column"):
        pack_documents(Dataset.from_dict({"text": ["abcd"]}), tok, 4, loss_on="answers")
    with pytest.raises(ValueError, match="loss_on='answer': valid values are \\['all', 'answers'\\]"):
        pack_documents(Dataset.from_dict({"text": ["abcd"]}), tok, 4, loss_on="answer")
    with pytest.raises(ValueError, match="'builtin:pydoc' marks no answers.*builtin:passkey"):
        load_documents("builtin:pydoc", answers=True)
    with pytest.raises(ValueError, match="needs a built-in corpus that marks its answers"):
        load_documents("data/*.txt", answers=True)
