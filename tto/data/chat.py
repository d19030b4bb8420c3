"""Conversations for dialog SFT (``dataset: {name: <file.jsonl>, format: chat}``).

One conversation a line of a ``.jsonl`` file: a list of turns ``{"role": system | user | assistant,
"content": ...}``, or a list of utterances (daily_dialog's ``dialog``: strings, the speakers taking
turns, the first as ``user``); a line may also be an object holding that list under
``dataset.text_field`` (``text_field: dialog`` for daily_dialog's own lines).

A conversation is rendered with the tokenizer's chat template, or :data:`PLAIN_CHAT_TEMPLATE` when
it has none (``builtin:bytes``)::

    System: <content>\\n           (a system turn)
    User: <content>\\n
    Assistant: <content></s>\\n    (the tokenizer's EOS ends each reply)

and the loss is on the assistant turns only: a turn's targets are the characters the template adds
for it after the generation prompt (its content and end-of-turn marks); every other label is -100.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset

from ..typed import shown

#: ``dataset.format`` -> the tokens the loss is on when ``dataset.loss_on`` is not given
DEFAULT_LOSS_ON = {"text": "all", "chat": "answers"}

ROLES = ("system", "user", "assistant")
#: roles of a list of utterances, in turn from the first
UTTERANCE_ROLES = ("user", "assistant")

#: the chat template of tokenizers without one (jinja, as Transformers renders chat templates)
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, else :data:`PLAIN_CHAT_TEMPLATE`."""
    return tokenizer.chat_template or PLAIN_CHAT_TEMPLATE


def render(tokenizer, messages: list[dict], prompt: bool = False) -> str:
    """`messages` as text in the tokenizer's chat template; `prompt` adds the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=prompt)


def conversation(value, where: str, text_field: str) -> list[dict]:
    """One line's conversation as ``[{role, content}, ...]``; ValueError naming `where` for anything else."""
    if isinstance(value, dict):
        if text_field not in value:
            raise ValueError(f"{where}: an object without the key {text_field!r} (dataset.text_field); "
                             f"keys: {sorted(value)}")
        value = value[text_field]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: a conversation is a non-empty list of turns, not {shown(value)}")
    if all(isinstance(turn, str) for turn in value):
        return [{"role": UTTERANCE_ROLES[i % 2], "content": turn} for i, turn in enumerate(value)]
    for turn in value:
        if not (isinstance(turn, dict) and set(turn) == {"role", "content"} and turn["role"] in ROLES
                and isinstance(turn["content"], str)):
            raise ValueError(f"{where}: a turn is {{\"role\": {' | '.join(ROLES)}, \"content\": <text>}}, not "
                             f"{shown(turn)}")
    if not any(turn["role"] == "assistant" for turn in value):
        raise ValueError(f"{where}: no assistant turn (the loss is on assistant turns: nothing to learn)")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def read_conversations(files: list[str], text_field: str) -> Dataset:
    """Every line of the .jsonl `files` as a conversation: a Dataset with one ``messages`` column."""
    out = []
    for name in files:
        if Path(name).suffix != ".jsonl":
            raise ValueError(f"dataset {name!r}: format chat reads .jsonl files, one conversation a line")
        with open(name, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name}:{number}: not JSON ({err.msg})") from None
                out.append(conversation(value, f"{name}:{number}", text_field))
    if not out:
        raise ValueError(f"dataset {files[0] if len(files) == 1 else files[:3]!r}: no conversation in it")
    return Dataset.from_dict({"messages": out})


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns: from the
    end of the generation prompt that precedes a turn to the end of the text rendered with it.
    ValueError when the template does not render a conversation as the extension of its beginnings."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(tokenizer, messages[:i], prompt=True), render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the tokenizer's chat template does not render a conversation as the continuation "
                             "of its first turns; its assistant turns cannot be found for the loss")
        spans.append((len(before), len(through)))
    return text, spans


def render_chats(ds: Dataset, tokenizer) -> Dataset:
    """Conversations (a ``messages`` column) as documents with ``text`` and ``answers`` (the assistant
    spans) columns, for :func:`tto.data.pack_documents` with ``loss_on="answers"``."""
    rendered = [assistant_spans(tokenizer, messages) for messages in ds["messages"]]
    return Dataset.from_dict({"text": [t for t, _ in rendered], "answers": [[list(s) for s in a] for _, a in rendered]})
