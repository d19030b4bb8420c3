"""eval.py and tto/eval: task generators, scoring on models whose answers are known, the CLI on a
tto model and an HF Llama, clear errors before any work, and the lm-eval entry point."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import tto
from tto.data import load_tokenizer
from tto.data.corpora import FILLER
from tto.eval import LM, get_task
from tto.eval.base import SentenceStream
from tto.eval.memory import memory_example
from tto.eval.mqar import mqar_example
from tto.eval.niah import NEEDLES, niah_example

from conftest import damaged_copy

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
eval_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_cli)


TOK = load_tokenizer("builtin:bytes")
V = len(TOK)
#: logit of the copied token in LookupLM (every other token: 0), so a right copy costs ~V * e^-30 nats
COPY_LOGIT = 30.0


class LookupLM(nn.Module):
    """An exact-lookup model: at each position it finds the earlier position whose preceding text
    matches the longest suffix of the text so far (the most recent one on ties) and predicts the token
    that followed there. It answers any question whose answer follows its cue verbatim earlier."""

    def forward(self, input_ids, **kw):
        logits = torch.zeros(*input_ids.shape, V)
        for b, row in enumerate(input_ids.tolist()):
            match = [0] * len(row)  # match[j]: length of the common suffix of row[:t+1] and row[:j+1]
            for t in range(len(row)):
                match = [(match[j - 1] + 1 if j and row[j] == row[t] else int(row[j] == row[t])) for j in range(t)]
                best = max(range(t), key=lambda j: (match[j], j), default=None)
                if best is not None and match[best] > 0:
                    logits[b, t, row[best + 1]] = COPY_LOGIT
        return SimpleNamespace(logits=logits)


class UniformLM(nn.Module):
    """Every token equally likely: loss ln V everywhere; the argmax is token 0 (<pad>), never an answer."""

    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))


def lm(model) -> LM:
    return LM(type(model).__name__, "-", model, TOK, "cpu")


def find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


def task(name: str, limit=None, **options):
    cls = get_task(name)
    return cls(cls.Options(**options), seed=0, limit=limit, batch_size=4)


# --- generators -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(NEEDLES))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_appears_once_at_its_depth_and_the_answer_is_recoverable(kind, depth):
    import random

    model = lm(UniformLM())
    texts = [FILLER] if NEEDLES[kind].haystack == "noise" else task("niah", needles=[kind]).texts["prose"]
    stream = SentenceStream.from_texts(model, texts)
    length = 300
    ex = niah_example(model, stream, kind, length, depth, random.Random(f"t{depth}"))
    spec = NEEDLES[kind]
    needle = TOK.encode(spec.sentence.format(key=ex.answer), add_special_tokens=False)
    question = TOK.encode(spec.question, add_special_tokens=False)
    assert ex.prompt_length == length and ex.ids[length - len(question) : length] == question
    assert find(ex.ids, needle) == [ex.needle[0]]  # exactly once
    assert TOK.decode(ex.ids[length:]) == ex.answer and ex.answer in TOK.decode(needle)
    assert re.fullmatch(r"\d{5}|\d{7}|[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", ex.answer)
    hay = length - len(needle) - len(question)
    before = TOK.decode(ex.ids[: ex.needle[0]])
    assert before == "" or before[-1].isspace()  # at a sentence start, not inside a word
    if kind == "passkey":  # noise sentences are at most this long: the needle is that close to its depth
        longest = max(len(s) + 1 for s in FILLER.split(". "))
        assert abs(ex.needle[0] - depth * hay) <= longest / 2 + 1
    if depth == 0:
        assert ex.needle[0] == 0
    if depth == 1:
        assert ex.needle[1] == length - len(question)


def test_mqar_keys_are_unique_and_every_answer_is_its_value():
    import random

    model = lm(UniformLM())
    for seed in range(5):
        ex = mqar_example(model, random.Random(seed), 16, 400, 3, 2)
        text = TOK.decode(ex.ids)
        written, asked = text.split(" | ")
        keys = re.findall(r"([a-z]{3})=(\d\d)", written)
        assert len(ex.ids) == 400 and len(keys) == 16 and len({k for k, _ in keys}) == 16
        table = dict(keys)
        asked_keys = re.findall(r"([a-z]{3})=", asked)
        assert sorted(asked_keys) == sorted(table)  # each key asked once
        for key, (a, b) in zip(asked_keys, ex.answers):
            assert TOK.decode(ex.ids[a:b]) == table[key] and TOK.decode(ex.ids[a - 4 : a]) == key + "="
    assert mqar_example(model, random.Random(0), 16, 100, 3, 2) is None  # 16 pairs do not fit in 100 tokens


def test_memory_example_repeats_the_passage_after_a_disjoint_distractor():
    import random

    stream = list(range(4, 260)) * 4
    ex = memory_example(stream, random.Random(1), lead=16, passage=32, gap=100)
    (a, b), (c, d) = ex.first, ex.second
    assert (a, b, c, d) == (16, 48, 148, 180) and ex.ids[a:b] == ex.ids[c:d]
    assert ex.ids[b:c] != ex.ids[a:b][: c - b]


def test_generators_are_deterministic_across_processes():
    """Same seed, same pairs, whatever the process's hash seed (a set's order would differ). The
    child loads only corpora.py (no torch import), which mqar and builtin:recall share."""
    from tto.data.corpora import recall_documents

    code = ("import importlib.util, json, sys; s = importlib.util.spec_from_file_location('c', sys.argv[1]);"
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m);"
            "print(json.dumps(m.recall_documents(50, pairs=16, seed=3)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    child = subprocess.run([sys.executable, "-c", code, str(ROOT / "tto/data/corpora.py")], env=env,
                           capture_output=True, text=True, check=True)
    assert json.loads(child.stdout) == recall_documents(50, pairs=16, seed=3)
    t = task("mqar", pairs=[8], lengths=[128], samples=2)
    first = [e.ids for es in t.examples(lm(UniformLM())).values() for e in es]
    assert first == [e.ids for es in t.examples(lm(UniformLM())).values() for e in es]
    t.seed = 4
    assert [e.ids for es in t.examples(lm(UniformLM())).values() for e in es] != first


# --- scoring on models with known behaviour ---------------------------------------------------

def test_mqar_lookup_model_scores_1_and_uniform_model_scores_0():
    t = task("mqar", pairs=[2, 8], lengths=[96, 160], samples=2)
    right = t.run(lm(LookupLM()))
    assert right["accuracy"] == [[1.0, 1.0], [None, 1.0]] and right["mean"] == 1.0  # 8 pairs do not fit in 96
    wrong = t.run(lm(UniformLM()))
    assert wrong["accuracy"] == [[0.0, 0.0], [None, 0.0]] and wrong["mean"] == 0.0


def test_niah_lookup_model_scores_1_and_uniform_model_scores_0():
    t = task("niah", lengths=[160, 240], depths=[0.0, 0.5, 1.0], samples=1)
    right = t.run(lm(LookupLM()))
    for kind in NEEDLES:
        assert right["needles"][kind]["accuracy"] == [[1.0, 1.0]] * 3, kind
    assert t.run(lm(UniformLM()))["accuracy"] == 0.0


def test_niah_half_right_model_scores_half():
    """A model that answers only when the needle is in the second half of the context."""

    class SecondHalf(LookupLM):
        def forward(self, input_ids, **kw):
            out = super().forward(input_ids)
            t = input_ids.shape[1]
            needle_late = [TOK.decode(r[t // 2 :]).count("pass key is") == 2 for r in input_ids.tolist()]
            out.logits[~torch.tensor(needle_late)] = 0
            return out

    t = task("niah", needles=["passkey"], lengths=[200], depths=[0.0, 1.0], samples=2)
    assert t.run(lm(SecondHalf()))["needles"]["passkey"]["accuracy"] == [[0.0], [1.0]]


def test_memory_uniform_model_has_no_improvement_and_lookup_model_nearly_full():
    t = task("memory", passages=[48], gaps=[0, 40], lead=8, samples=2)
    flat = t.run(lm(UniformLM()))
    for cell in flat["cells"]:
        assert cell["first"] == pytest.approx(math.log(V), abs=1e-5)
        assert abs(cell["improvement"]) < 1e-6
    copy = t.run(lm(LookupLM()))
    for cell in copy["cells"]:  # at most the passage's first couple of tokens are not copied
        assert cell["second"] < 3 * COPY_LOGIT / 48 and cell["relative"] > 0.85


def test_ppl_of_uniform_model_is_vocab_size_and_bits_per_byte_count_bytes(tmp_path):
    """Documents of 63 ASCII bytes + EOS fill 64-token blocks exactly: 63 predicted tokens, 62 of them bytes."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{i:03d}" + "x" * 60}) + "\n" for i in range(10)))
    result = task("ppl", dataset=str(docs), eval_fraction=0.0, length=64).run(lm(UniformLM()))
    assert result["blocks"] == 10
    assert result["ppl"] == pytest.approx(V, rel=1e-5)
    assert result["bpb"] == pytest.approx(math.log2(V) * 63 / 62, rel=1e-6)


# --- the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny tto model (with the byte tokenizer saved) and a random tiny HF Llama (without)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = tto.build_config("ttt", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              vocab_size=V, mini_batch_size=8)
    tto.get("ttt").model_class(config).save_pretrained(root / "ttt")
    TOK.save_pretrained(root / "ttt")
    llama = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    LlamaForCausalLM(llama).save_pretrained(root / "llama")
    return root


GRID = ["ppl.length=64", "position.length=96", "position.bins=6", "memory.passages=16", "memory.gaps=0,32",
        "niah.lengths=96,128", "niah.depths=0,1", "mqar.pairs=2,4", "mqar.lengths=64"]


def test_cli_on_a_tto_model_and_a_llama(models, tmp_path, capsys):
    out = tmp_path / "out"
    results = eval_cli.main(["--model", str(models / "ttt"), "--model", str(models / "llama"), "--out", str(out),
                             "--limit", "1", "--no-progress", "--grid", *GRID])
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert set(saved["results"]) == {"ppl", "position", "memory", "niah", "mqar"}
    for per_model in saved["results"].values():
        assert set(per_model) == {"ttt", "llama"}
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["memory.png", "mqar.png", "niah_llama.png", "niah_ttt.png", "position.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    table = capsys.readouterr().out
    assert re.search(r"^model\s+ppl\s+bpb\s+loss@start\s+loss@end\s+mem.rel\s+niah\s+mqar$", table, re.M)
    assert re.search(r"^ttt\s", table, re.M) and re.search(r"^llama\s", table, re.M)
    # the Llama's perplexity equals its own loss on the first held-out block, computed by transformers
    from datasets import Dataset

    from tto.data import pack_documents
    from tto.training import DatasetSection, split_documents

    block = pack_documents(Dataset.from_dict({"text": split_documents(DatasetSection())[1]["text"]}), TOK, 64)[0]
    ids = torch.tensor([block["input_ids"]])
    with torch.no_grad():
        loss = LlamaForCausalLM.from_pretrained(models / "llama")(input_ids=ids, labels=ids).loss.item()
    assert saved["results"]["ppl"]["llama"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert saved["results"]["position"]["ttt"]["sequences"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "ppl,nah"], "unknown task 'nah' (did you mean 'niah'?); valid tasks: "),
    (["--grid", "niah.depths=0,1.5"], "niah.depths [0.0, 1.5]: each must be in [0, 1]"),
    (["--grid", "niah.lenghts=64"], "unknown option of task 'niah' (did you mean 'lengths'?)"),
    (["--grid", "niah.lengths=64,abc"], "niah.lengths='abc': expected int"),
    (["--grid", "niah.needles=passkey,needle"], "unknown kind(s) ['needle']; valid: ['number', 'passkey', 'uuid']"),
    (["--grid", "mqar.pairs=4", "--tasks", "niah"], "task 'mqar' is not among --tasks niah"),
    (["--grid", "lengths=4"], "expected TASK.OPTION=VALUE"),
    (["--limit", "0"], "argument --limit: '0': expected int >= 1"),
])
def test_bad_input_fails_in_one_line_before_any_work(models, tmp_path, argv, message, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--model", str(models / "ttt"), "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_unreadable_model_directory_is_named(models, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for path, message in [(tmp_path / "none", "no such directory"), (broken, "config.json is not valid JSON")]:
        with pytest.raises(SystemExit):
            eval_cli.main(["--model", str(models / "ttt"), "--model", str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert f"--model '{path}'" in err and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_weights_are_one_line_and_leave_no_out(models, tmp_path, how, capsys):
    broken = damaged_copy(models / "ttt", tmp_path / "m", how)
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--model", str(broken), "--out", str(tmp_path / "out"), "--tasks", "ppl"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.splitlines() == [err] and "model.safetensors is truncated or corrupt" in err
    assert not (tmp_path / "out").exists()


def test_a_hub_name_in_the_local_cache_is_evaluated(models, hub_cache, tmp_path):
    hub_cache("someone/tiny", models / "ttt")
    args = ["--tasks", "ppl", "--grid", "ppl.length=64", "--limit", "1", "--no-progress"]
    cached = eval_cli.main(["--model", "someone/tiny", "--out", str(tmp_path / "a"), *args])
    local = eval_cli.main(["--model", str(models / "ttt"), "--out", str(tmp_path / "b"), *args])
    assert cached["models"]["tiny"]["path"] == "someone/tiny"
    assert cached["results"]["ppl"]["tiny"] == local["results"]["ppl"]["ttt"]


@pytest.mark.parametrize("recipe", ["mqar", "passkey"])
@pytest.mark.parametrize("name", list(tto.available()))
def test_task_recipes_build_every_type(recipe, name):
    """configs/tasks/*.yml hold only backbone fields, so `model.type=<any type>` trains the same size."""
    from tto.training import load_recipe

    r = load_recipe(ROOT / "configs" / "tasks" / f"{recipe}.yml", [f"model.type={name}"])
    assert r.dataset.name == f"builtin:{'recall' if recipe == 'mqar' else recipe}"
    fields = {k: v for k, v in r.model.items() if k != "type"}
    with torch.device("meta"):
        tto.get(name).model_class(tto.build_config(name, **fields, vocab_size=V))


@pytest.mark.parametrize("recipe", ["mqar", "passkey"])
def test_task_recipes_fit_every_document_in_one_block(recipe):
    """packing: false keeps one document per block: each one (bytes and EOS) must fit, none be cut."""
    from tto.data import builtin_documents
    from tto.training import load_recipe

    ds = load_recipe(ROOT / "configs" / "tasks" / f"{recipe}.yml", []).dataset
    docs = builtin_documents(ds.name, **{**ds.options, "num_documents": 2000})
    assert max(len(d.encode()) for d in docs) + 1 == ds.max_seq_length  # the bound is tight: no wasted pad


# --- lm-evaluation-harness ------------------------------------------------------------------------

def test_harness_runs_lm_eval_on_a_tto_checkpoint_offline(models, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is optional (pip install -r requirements-eval.txt; CI installs it)")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["The sky is blue.", "The grass is green."]))
    (tmp_path / "toy.yaml").write_text(
        f"task: toy_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "tto.harness", "--model", "hf", "--model_args",
         f"pretrained={models / 'ttt'},dtype=float32", "--tasks", "toy_ppl", "--include_path", str(tmp_path),
         "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "lm_eval_out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((tmp_path / "lm_eval_out").rglob("results*.json"))
    assert len(files) == 1
    bpb = json.loads(files[0].read_text())["results"]["toy_ppl"]["bits_per_byte,none"]
    assert math.log2(V) * 0.9 < bpb < math.log2(V) * 1.2  # a random model: about uniform over 260 tokens
