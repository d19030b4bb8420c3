"""infer.py: every type offline, trained models, chat with a persistent state, clear usage errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tto
from tto.data import load_tokenizer
from tto.training import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
infer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(infer)


pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(name, variant) for name, entry in ((n, tto.get(n)) for n in tto.available())
         for variant in (entry.variants or [None])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    train(load_recipe(ROOT / "configs/tiny/ttt.yml", [f"training_args.output_dir={out}", "training_args.max_steps=10"]))
    return out


@pytest.mark.parametrize("name,variant", CASES)
def test_random_init_model_of_every_type(name, variant, capsys):
    argv = ["--config-type", name, "--prompt", "hello", "--max_new_tokens", "5", "--temperature", "0"]
    assert infer.main(argv + (["--variant", variant] if variant else [])) == 0
    assert "tokens/s" in capsys.readouterr().err


def test_trained_model_greedy_output_matches_generate(trained, capsys):
    assert infer.main(["--model", str(trained), "--prompt", "The assert", "--max_new_tokens", "12",
                       "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    model, tok = AutoModelForCausalLM.from_pretrained(trained), load_tokenizer(str(trained))
    ids = tok("The assert", return_tensors="pt", add_special_tokens=False).input_ids
    expect = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert printed.strip() == expect.strip()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random tiny HF Llama with the byte tokenizer: infer.py is not only for tto models."""
    out = tmp_path_factory.mktemp("llama")
    tok = load_tokenizer("builtin:bytes")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("model_dir", ["trained", "llama"])
def test_chat_keeps_the_state_instead_of_rereading(model_dir, capsys, monkeypatch, request):
    """The second reply, produced from the carried state (tto: fast weights; Llama: its KV cache)
    plus the new turn only, equals a greedy continuation of the whole conversation read from scratch."""
    trained = request.getfixturevalue(model_dir)
    answers = iter(["second turn"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    already_read = []  # per turn: (tokens the cache holds, tokens of the conversation so far)
    generate = infer.generate

    def recording(model, tok, ids, cache, args):
        already_read.append((cache.get_seq_length(), ids.shape[1]))
        return generate(model, tok, ids, cache, args)

    monkeypatch.setattr(infer, "generate", recording)
    with pytest.raises(StopIteration):
        infer.main(["--model", str(trained), "--chat", "--prompt", "first turn", "--max_new_tokens", "6",
                    "--temperature", "0"])
    (first_cached, first_len), (second_cached, second_len) = already_read
    assert first_cached == 0 and 0 < second_cached < second_len  # turn 2 reads only what is new
    model, tok = AutoModelForCausalLM.from_pretrained(trained), load_tokenizer(str(trained))
    enc = lambda s: tok(s, return_tensors="pt", add_special_tokens=False).input_ids  # noqa: E731
    with torch.no_grad():
        first = model.generate(enc("User: first turn\nAssistant:"), max_new_tokens=6, do_sample=False)
        history = torch.cat([first, enc("\nUser: second turn\nAssistant:")], dim=1)
        second = model.generate(history, max_new_tokens=6, do_sample=False)
    expect = tok.decode(second[0, history.shape[1]:])
    assert capsys.readouterr().out.split("\n\n")[1].strip() == expect.strip()


@pytest.mark.parametrize("argv,message", [
    (["--model", "x", "--config-type", "ttt"], "exactly one of"),
    ([], "exactly one of"),
    (["--config-type", "tt"], "did you mean 'ttt'"),
    (["--config-type", "ttt", "--variant", "mlpp"], "unknown variant"),
    (["--model", "/no/such/dir"], "no config.json"),
    (["--config-type", "ttt", "--history", "2"], "--history only applies with --chat"),
    (["--config-type", "ttt", "--tokenizer", "/no/such/tokenizer"], "no such directory"),
    (["--config-type", "ttt", "--tokenizer", "someone/tokenizer"], "not reachable"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
