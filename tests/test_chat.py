"""Dialog SFT data: conversations from .jsonl, rendered with a chat template, loss on assistant turns only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tto.data import load_documents, load_tokenizer, pack_documents
from tto.data.chat import render_chats
from tto.training import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
DIALOGS = ROOT / "tests" / "data" / "dialogs.jsonl"

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Bye."}]
#: a ChatML template (SmolLM2's kind): special-looking marks the byte tokenizer reads as bytes
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_lines(path: Path, lines: list) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def labelled(tok, conversation, tmp_path) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation, unpacked (one conversation per block)."""
    docs = load_documents(write_lines(tmp_path / "c.jsonl", [conversation]), format="chat")
    block = pack_documents(render_chats(docs, tok), tok, 256, loss_on="answers", packing=False)[0]
    n = sum(block["attention_mask"])
    return block["input_ids"][:n], block["labels"][:n]


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels written out by hand: (text, is an assistant turn) pieces, then the EOS that ends a
    document (no label)."""
    ids, labels = [], []
    for text, target in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if target else [-100] * len(piece)
    return ids + [tok.eos_token_id], labels + [-100]


def test_plain_template_labels_exactly_the_assistant_turns(tmp_path):
    tok = load_tokenizer("builtin:bytes")
    assert tok.chat_template is None
    ids, labels = labelled(tok, CONVERSATION, tmp_path)
    assert (ids, labels) == expected(tok, [("System: Be brief.\nUser: Hi?\nAssistant: ", False),
                                           ("Hello.</s>\n", True), ("User: Bye?\nAssistant: ", False),
                                           ("Bye.</s>\n", True)])
    assert labels.count(tok.eos_token_id) == 2  # each reply ends with the EOS the model learns to stop at


def test_the_tokenizers_own_template_is_used(tmp_path):
    tok = load_tokenizer("builtin:bytes")
    tok.chat_template = CHATML
    ids, labels = labelled(tok, CONVERSATION, tmp_path)
    assert (ids, labels) == expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello.<|im_end|>\n", True), ("<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Bye.<|im_end|>\n", True)])


def test_utterance_lists_alternate_user_and_assistant(tmp_path):
    """daily_dialog's lines: {"dialog": [utterances]}, the first speaker as the user."""
    path = write_lines(tmp_path / "d.jsonl", [{"dialog": ["a", "b", "c"]}, ["d", "e"]])
    docs = load_documents(path, format="chat", text_field="dialog")
    assert docs["messages"] == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}],
                                [{"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]]


def test_the_shipped_dialogs_load():
    docs = load_documents(str(DIALOGS), format="chat", text_field="dialog")
    assert len(docs) == sum(1 for line in DIALOGS.read_text().splitlines() if line.strip())
    assert all(any(m["role"] == "assistant" for m in c) for c in docs["messages"])


@pytest.mark.parametrize("line,problem", [
    ("not json", "c.jsonl:2: not JSON"),
    ('[{"role": "robot", "content": "x"}]', "c.jsonl:2: a turn is {\"role\": system | user | assistant"),
    ('[{"role": "user", "content": "x"}]', "c.jsonl:2: no assistant turn"),
    ("[]", "c.jsonl:2: a conversation is a non-empty list of turns"),
    ('{"messages": []}', "c.jsonl:2: an object without the key 'text' (dataset.text_field); keys: ['messages']"),
])
def test_bad_lines_are_named_with_their_line_number(line, problem, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('["hi", "hello"]\n' + line + "\n")
    with pytest.raises(ValueError) as err:
        load_documents(str(path), format="chat")
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_chat_format_checks_in_the_recipe():
    section = parse_recipe({"dataset": {"name": "x.jsonl", "format": "chat"}, "model": {"type": "transformer"}}).dataset
    assert section.targets == "answers"  # the assistant turns, unless loss_on says otherwise
    with pytest.raises(ValueError, match=r"dataset.format='dialog': valid values are \['text', 'chat'\]"):
        parse_recipe({"dataset": {"format": "dialog"}, "model": {"type": "transformer"}})
    with pytest.raises(ValueError, match="format chat reads .jsonl files"):
        load_documents(str(ROOT / "README.md"), format="chat")
