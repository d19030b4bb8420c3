"""infer.py: every type offline, trained models, chat with a persistent state, clear usage errors."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tto
from tto.data import load_tokenizer
from tto.data.chat import render
from tto.cli import os_reason
from tto.training import load_recipe, train

from conftest import damaged_copy

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
infer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(infer)



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


@pytest.fixture(scope="module")
def ttt_e2e(tmp_path_factory):
    """configs/tiny/ttt_e2e.yml's model, random, with prime MLPs that step every 8 tokens by 3.0 (window 16)."""
    out = tmp_path_factory.mktemp("ttt_e2e")
    tiny_model("ttt_e2e", mini_batch_size=8, sliding_window=16, inner_lr=3.0).save_pretrained(out)
    load_tokenizer("builtin:bytes").save_pretrained(out)
    return out


def chat(monkeypatch, argv: list[str], turns: list[str]) -> list[tuple[int, int]]:
    """Run infer.py --chat greedily on `turns` (the first as --prompt); per turn, (tokens the cache held,
    tokens of the ids given) when the reply started."""
    answers = iter(turns[1:])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    already_read = []
    generate = infer.generate

    def recording(model, tok, ids, cache, args):
        already_read.append((cache.get_seq_length(), ids.shape[1]))
        return generate(model, tok, ids, cache, args)

    monkeypatch.setattr(infer, "generate", recording)
    with pytest.raises(StopIteration):
        infer.main([*argv, "--chat", "--prompt", turns[0], "--max_new_tokens", "6", "--temperature", "0"])
    return already_read


def greedy_reply(model, tok, messages) -> str:
    """The greedy reply to `messages`, read from scratch in the tokenizer's chat template."""
    ids = tok(render(tok, messages, prompt=True), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("model_dir", ["trained", "ttt_e2e"])
def test_chat_keeps_a_memory_models_state_instead_of_rereading(model_dir, capsys, monkeypatch, request):
    """The second reply, produced from the carried state (fast weights; TTT-E2E's adapted prime MLPs and
    windows) plus the new turn only, equals a greedy continuation of the whole conversation in the chat
    template read from scratch."""
    trained = request.getfixturevalue(model_dir)
    (first_cached, first_len), (second_cached, second_len) = chat(monkeypatch, ["--model", str(trained)],
                                                                  ["first turn", "second turn"])
    assert first_cached == 0 and 0 < second_cached < second_len  # turn 2 reads only what is new
    model, tok = AutoModelForCausalLM.from_pretrained(trained), load_tokenizer(str(trained))
    first = greedy_reply(model, tok, [{"role": "user", "content": "first turn"}])
    messages = [{"role": "user", "content": "first turn"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "second turn"}]
    assert capsys.readouterr().out.split("\n\n")[1].strip() == greedy_reply(model, tok, messages).strip()


@pytest.mark.parametrize("history", [[], ["--history", "1"]])
def test_chat_rereads_the_last_turns_for_a_model_without_memory(llama, history, capsys, monkeypatch):
    """A model without a memory (here a Llama) re-reads, from an empty cache, the last --history turns
    (default 5) in the chat template: 2 turns fit in 5, --history 1 keeps only the new one."""
    read = chat(monkeypatch, ["--model", str(llama), *history], ["first turn", "second turn"])
    assert [cached for cached, _ in read] == [0, 0]
    model, tok = AutoModelForCausalLM.from_pretrained(llama), load_tokenizer(str(llama))
    first = greedy_reply(model, tok, [{"role": "user", "content": "first turn"}])
    messages = [{"role": "user", "content": "first turn"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "second turn"}][-1 if history else 0:]
    assert capsys.readouterr().out.split("\n\n")[1].strip() == greedy_reply(model, tok, messages).strip()


def test_last_turns_keeps_the_system_message():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert infer.last_turns(messages, 1) == [messages[0], messages[3]]
    assert infer.last_turns(messages, 2) == infer.last_turns(messages, 5) == messages


@pytest.mark.parametrize("argv,message", [
    (["--model", "x", "--config-type", "ttt"], "exactly one of"),
    ([], "exactly one of"),
    (["--config-type", "tt"], "did you mean 'ttt'"),
    (["--config-type", "ttt", "--variant", "mlpp"], "unknown variant"),
    (["--model", "/no/such/dir"], "no such directory"),
    (["--config-type", "ttt", "--history", "2"], "--history only applies with --chat"),
    (["--config-type", "ttt", "--tokenizer", "/no/such/tokenizer"], "no such directory"),
    (["--config-type", "ttt", "--tokenizer", "someone/tokenizer"], "not reachable"),
    (["--config-type", "ttt", "--prompt", ""], "--prompt is empty"),
    (["--config-type", "ttt", "--chat", "--history", "0"], "--history: '0': expected int >= 1"),
    (["--config-type", "ttt", "--chat", "--history", "-1"], "--history: '-1': expected int >= 1"),
    (["--config-type", "ttt", "--device", "gpu"], "--device 'gpu': no such device on this machine; valid: auto, cpu"),
    (["--config-type", "ttt", "--device", "cuda:99"], "--device 'cuda:99': no such device on this machine; valid: auto, cpu"),
    (["--model", "someone/not-cached"], "not in the local Hugging Face cache"),
    (["--adapter", "/no/such/dir"], "--adapter '/no/such/dir': no adapter_config.json there"),
    (["--adapter", "/no/such/dir", "--config-type", "ttt"], "--adapter loads over a saved base"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("name,variant", CASES)
def test_a_zero_length_input_is_a_clear_error(name, variant):
    entry = tto.get(name)
    fields = {k: v for k, v in load_recipe(ROOT / "configs/tiny" / f"{name}.yml").model.items() if k != "type"}
    if variant is not None:
        fields[entry.config_class.variant_field] = variant
    model = entry.model_class(tto.build_config(name, **fields))
    with pytest.raises(ValueError, match="the input has no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_prompt_bytes_that_are_not_utf8_are_replaced(monkeypatch, capsys):
    """argv arrives as surrogate escapes (Python's decoding of undecodable bytes); they become U+FFFD."""
    seen = []
    generate = infer.generate
    monkeypatch.setattr(infer, "generate", lambda model, tok, ids, cache, args: seen.append(tok.decode(ids[0]))
                        or generate(model, tok, ids, cache, args))
    assert infer.main(["--config-type", "ttt", "--prompt", b"\xff\xfeab".decode("utf-8", "surrogateescape"),
                       "--max_new_tokens", "2", "--temperature", "0"]) == 0
    assert seen == ["\ufffd\ufffdab"]
    assert "not valid UTF-8; its invalid bytes were replaced by U+FFFD" in capsys.readouterr().err


def run_infer(*argv, stdin=b""):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *argv], input=stdin, capture_output=True,
                          env=env, timeout=600)


def test_stdin_not_utf8_then_end_of_input():
    """A real process: bad bytes on stdin are replaced (the reply is written), then the end of input
    ends the chat with status 0."""
    done = run_infer("--config-type", "ttt", "--max_new_tokens", "2", "--chat", stdin=b"\xff\xfeab\n")
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err and "replaced by U+FFFD" in err and "decode: 2 tokens" in err


@pytest.mark.parametrize("chat", [[], ["--chat"]])
def test_end_of_input_at_the_prompt_ends_with_status_0(chat, monkeypatch, capsys):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert infer.main(["--config-type", "ttt", *chat]) == 0
    assert capsys.readouterr().err == ""


def as_from_a_terminal() -> None:
    """In a child before it runs a command: SIGINT handled by default and not blocked, as a shell
    starts a command, whatever the test process inherited or changed (an ignored or blocked signal
    would survive the exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt():
    """A real process and real SIGINTs: the first stops an endless reply and the chat goes on (the
    next reply is written from the kept state); Ctrl-C at the prompt then ends it, status 130."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--config-type", "ttt", "--chat",
                             "--max_new_tokens", "1000000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, preexec_fn=as_from_a_terminal)
    out = bytearray()
    threading.Thread(target=lambda: [out.extend(c) for c in iter(lambda: proc.stdout.read(1), b"")], daemon=True).start()

    def wait_for_prompt(count):
        deadline = time.monotonic() + 600
        while out.count(b"you> ") < count:
            assert time.monotonic() < deadline and proc.poll() is None, (bytes(out), proc.poll())
            time.sleep(0.05)

    wait_for_prompt(1)
    for turn in (1, 2):
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        time.sleep(1.0)  # the reply is endless: this lands in it (prefill or decode)
        proc.send_signal(signal.SIGINT)
        wait_for_prompt(turn + 1)
    proc.send_signal(signal.SIGINT)  # at the prompt
    assert proc.wait(timeout=600) == 130
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and err.count("stopped by Ctrl-C") + err.count("stopped while reading") == 2, err


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_weights_are_one_line(trained, tmp_path, how, capsys):
    broken = damaged_copy(trained, tmp_path / "m", how)
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--model", str(broken), "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.splitlines() == [err] and "model.safetensors is truncated or corrupt" in err


def test_os_errors_are_named_by_their_cause():
    assert os_reason(PermissionError(13, "Permission denied", "w")) == "permission denied"
    assert os_reason(FileNotFoundError(2, "No such file or directory", "w")) == "no such file or directory"


def without_file_permission_override() -> list[str]:
    """A command prefix under which file permissions apply to this user: none for a normal user; for
    root, setpriv dropping the capabilities that let root read anything."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.fail("running as root needs setpriv (util-linux) to test unreadable files")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("target", ["model.safetensors", "."])
def test_unreadable_weights_or_directory_is_permission_denied(trained, tmp_path, target):
    model = tmp_path / "m"
    shutil.copytree(trained, model)
    (model / target).chmod(0)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run([*without_file_permission_override(), sys.executable, str(ROOT / "infer.py"),
                               "--model", str(model), "--prompt", "x"], capture_output=True, env=env, timeout=600)
    finally:
        (model / target).chmod(0o755)
    err = done.stderr.decode().strip()
    what = "cannot read model.safetensors" if target != "." else "cannot read the directory"
    assert done.returncode == 2 and err.splitlines() == [err] and f"{what} (permission denied)" in err, err


def test_a_hub_name_in_the_local_cache_loads(trained, hub_cache, capsys):
    hub_cache("someone/tiny", trained)
    assert infer.main(["--model", "someone/tiny", "--prompt", "The assert", "--max_new_tokens", "4",
                       "--temperature", "0"]) == 0
    from_cache = capsys.readouterr().out
    assert infer.main(["--model", str(trained), "--prompt", "The assert", "--max_new_tokens", "4",
                       "--temperature", "0"]) == 0
    assert from_cache == capsys.readouterr().out


def tiny_model(name, variant=None, **overrides):
    """The model of configs/tiny/<name>.yml with random weights and the byte tokenizer's vocabulary."""
    entry = tto.get(name)
    fields = {k: v for k, v in load_recipe(ROOT / "configs/tiny" / f"{name}.yml").model.items() if k != "type"}
    if variant is not None:
        fields[entry.config_class.variant_field] = variant
    torch.manual_seed(0)
    return entry.model_class(tto.build_config(name, **{**fields, "vocab_size": 260, **overrides})).eval()


@pytest.mark.parametrize("name,variant", CASES)
def test_prefill_in_pieces_gives_the_logits_and_tokens_of_one_forward(name, variant):
    """Pieces of 7 tokens cross every mini-batch / chunk / window boundary of the tiny configs."""
    model = tiny_model(name, variant)
    ids = torch.randint(4, 260, (1, 61), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = tiny_model(name, variant).double()  # only summation order differs: float64 rounding
        whole = exact(ids).logits
        cache = tto.TTOCache(model.config.num_hidden_layers)
        pieces = torch.cat([exact(ids[:, i : i + 7], past_key_values=cache, use_cache=True).logits
                            for i in range(0, ids.shape[1], 7)], dim=1)
        torch.testing.assert_close(pieces, whole, atol=1e-10, rtol=0)
        greedy = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(model.generate(ids, prefill_chunk_size=7, **greedy),
                           model.generate(ids, prefill_chunk_size=ids.shape[1], **greedy))


#: run in a fresh process: peak resident memory (MB) while `generate` reads a prompt of argv[1] random
#: tokens into the tiny ttt model. The kernel's high-water mark (VmHWM) is reset just before (writing 5
#: to /proc/self/clear_refs) so it is the peak of that call alone: torch's CPU allocator is invisible
#: to tracemalloc, and a sampled RSS would miss short peaks.
PEAK_DURING_PREFILL = """
import sys, torch
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
from test_infer import tiny_model
model, n = tiny_model("ttt"), int(sys.argv[1])
ids = torch.randint(4, 260, (1, n), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model.generate(ids[:, :2048], max_new_tokens=1, do_sample=False)  # warm-up: every kernel and buffer once
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model.generate(ids, max_new_tokens=1, do_sample=False)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def test_prefill_peak_memory_does_not_grow_with_the_prompt():
    """4x the prompt (8192 -> 32768 tokens), < 10% more peak memory for ttt. Read in one piece, the same
    prompts measured 541 and 711 MB (+31%); in pieces 501 and 502 MB (notes/infer.md)."""
    env = dict(os.environ)
    peak = [float(subprocess.run([sys.executable, "-c", PEAK_DURING_PREFILL, str(n), str(ROOT)], env=env, check=True,
                                 capture_output=True, text=True, timeout=900).stdout.split()[-1]) for n in (8192, 32768)]
    assert peak[1] < 1.1 * peak[0], peak
