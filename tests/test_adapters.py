"""Adapters (peft LoRA / TinyLoRA): the recipe section, training over a saved base of every registered
type and over a retrofitted Llama, loading with infer.py / eval.py --adapter.

Tolerance of merged vs unmerged logits: merging adds ``ΔW`` into ``W`` once instead of computing
``x W + x ΔW``; float32 rounding of logits of scale ~1 is ~1e-6 (5e-5 leaves room for the chunked
memory kernels, which sum in a different order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TinyLoraConfig
from transformers import AutoModelForCausalLM

import tto
from tto.adapters import ADAPTER_CONFIG, load_adapted, parse_adapter
from tto.data import load_tokenizer
from tto.training import load_recipe, parse_recipe, train


ROOT = Path(__file__).resolve().parents[1]
DIALOGS = ROOT / "tests" / "data" / "dialogs.jsonl"
ATOL = 5e-5
#: the adapters trained in these tests (target q_proj and v_proj, which every registered type has)
ADAPTERS = {"lora": {"type": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "tinylora": {"type": "tinylora", "r": 2, "u": 3, "target_modules": ["q_proj", "v_proj"]}}


def tiny_base(name: str, out: Path) -> Path:
    """configs/tiny/<name>.yml's model with random weights, saved with the byte tokenizer."""
    tok = load_tokenizer("builtin:bytes")
    fields = {k: v for k, v in load_recipe(ROOT / "configs/tiny" / f"{name}.yml").model.items() if k != "type"}
    fields.update(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    tto.get(name).model_class(tto.build_config(name, **fields)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sft_recipe(base: Path, out: Path, adapter: dict, **args):
    return parse_recipe({
        "dataset": {"name": str(DIALOGS), "format": "chat", "text_field": "dialog", "max_seq_length": 48,
                    "eval_fraction": 0.2},
        "model": {"from_pretrained": str(base)},
        "adapter": dict(adapter),
        "training_args": {"output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 2,
                          "learning_rate": 0.05, "save_strategy": "no", "report_to": "none", "seed": 0, **args}})


def expected_trainable(model, adapter: dict) -> int:
    """From the target modules' shapes: LoRA's A (r x in) and B (out x r); TinyLoRA's one vector v of u
    numbers per module (weight_tying 0: no module shares it)."""
    targets = [m for n, m in model.named_modules() if n.split(".")[-1] in adapter["target_modules"]]
    if adapter["type"] == "lora":
        return sum(adapter["r"] * (m.in_features + m.out_features) for m in targets)
    return adapter["u"] * len(targets)


def check_adapter_dir(base: Path, out: Path, kind: str, metrics: dict):
    """The saved adapter: only adapter weights, the trainable count of the formula, merged logits equal
    to peft's unmerged ones, and different from the base's (it trained)."""
    from safetensors.torch import load_file

    assert (out / ADAPTER_CONFIG).is_file() and not (out / "model.safetensors").exists()
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(("lora_" if kind == "lora" else "tinylora_") in k for k in saved)
    ids = torch.randint(4, 200, (1, 20), generator=torch.Generator().manual_seed(1))
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = base_model(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
        unmerged = peft_model(input_ids=ids).logits
        merged = load_adapted(str(out))(ids).logits
    assert metrics["trainable_parameters"] == expected_trainable(base_model, ADAPTERS[kind])
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    assert (merged - base_logits).abs().max() > 20 * ATOL  # it trained: well beyond the merge rounding


@pytest.mark.parametrize("kind", list(ADAPTERS))
@pytest.mark.parametrize("name", list(tto.available()))
def test_sft_with_an_adapter_over_every_type(name, kind, tmp_path):
    base = tiny_base(name, tmp_path / "base")
    recipe = sft_recipe(base, tmp_path / "sft", ADAPTERS[kind])
    assert isinstance(recipe.adapter, LoraConfig if kind == "lora" else TinyLoraConfig)
    metrics = train(recipe)
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    check_adapter_dir(base, tmp_path / "sft", kind, metrics)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_sft_over_a_retrofitted_llama(kind, tmp_path):
    """A pretrained Llama retrofitted (half its layers titans), saved, then adapted; the adapter also
    reaches the retrofitted layers' q_proj / v_proj."""
    from test_retrofit import TINY, llama

    tok = load_tokenizer("builtin:bytes")
    torch.manual_seed(0)
    model = tto.retrofit(llama(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), type="titans",
                         layers=[1, 3], **TINY["titans"])
    base = tmp_path / "retrofitted"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    check_adapter_dir(base, tmp_path / "sft", kind, train(sft_recipe(base, tmp_path / "sft", ADAPTERS[kind])))


@pytest.fixture(scope="module")
def sft_transformer(tmp_path_factory):
    """A tiny transformer base and a LoRA adapter trained over it on the dialogs."""
    root = tmp_path_factory.mktemp("sft")
    base = tiny_base("transformer", root / "base")
    train(sft_recipe(base, root / "sft", ADAPTERS["lora"], max_steps=6))
    return base, root / "sft"


def test_infer_adapter_generates_what_the_adapted_model_generates(sft_transformer, capsys):
    import infer

    base, adapter = sft_transformer
    assert infer.main(["--adapter", str(adapter), "--prompt", "User: hi", "--max_new_tokens", "8",
                       "--temperature", "0"]) == 0
    tok = load_tokenizer(str(adapter))
    ids = tok("User: hi", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = load_adapted(str(adapter)).generate(ids, max_new_tokens=8, do_sample=False)
    assert capsys.readouterr().out.strip() == tok.decode(out[0, ids.shape[1]:]).strip()


def test_eval_compares_the_base_and_the_adapter_side_by_side(sft_transformer, tmp_path):
    from tto.eval import evaluate

    base, adapter = sft_transformer
    printed = []
    results = evaluate([], ["memory", "ppl"], tmp_path / "eval", adapters=[str(adapter)], limit=1,
                       grid=["memory.gaps=0,8", "memory.passages=8"], progress=False, echo=printed.append)
    assert list(results["models"]) == ["base", "sft"]
    assert results["models"]["base"]["path"] == str(base.resolve())
    header, _, *rows = printed[0].splitlines()
    assert [r.split()[0] for r in rows] == ["base", "sft"] and "mem.rel" in header and "ppl" in header
    assert results["summary"]["base"]["ppl"] != results["summary"]["sft"]["ppl"]
    assert (tmp_path / "eval" / "memory.png").is_file()
    # the base given as --model as well is evaluated once
    again = evaluate([str(base)], ["ppl"], tmp_path / "eval2", adapters=[str(adapter)], limit=1, progress=False,
                     echo=lambda _: None)
    assert list(again["models"]) == ["base", "sft"]


@pytest.mark.parametrize("section,message", [
    ({"type": "loraa", "target_modules": ["q_proj"]}, "adapter.type='loraa' (did you mean 'lora'?); valid: "
                                                      "['lora', 'tinylora']"),
    ({"type": "lora", "rank": 4, "target_modules": ["q_proj"]}, "unknown adapter key(s) of type 'lora': 'rank'"),
    ({"type": "tinylora", "lora_alpha": 4, "target_modules": ["q_proj"]}, "unknown adapter key(s) of type 'tinylora': "
                                                                          "'lora_alpha'"),
    ({"type": "lora", "r": "four", "target_modules": ["q_proj"]}, "adapter.r='four': expected int"),
    ({"type": "lora", "r": 0, "target_modules": ["q_proj"]}, "adapter.r=0: must be >= 1"),
    ({"type": "tinylora", "weight_tying": 1.5, "target_modules": ["q_proj"]}, "adapter.weight_tying=1.5: must be in"),
    ({"type": "lora", "lora_dropout": 1, "target_modules": ["q_proj"]}, "adapter.lora_dropout=1: must be in [0, 1)"),
    ({"type": "lora"}, "adapter.target_modules: the modules to adapt"),
    ({"type": "lora", "target_modules": ["q_proj"], "task_type": "SEQ_CLS"}, "unknown adapter key(s)"),
    ([1, 2], "adapter: a mapping {type: lora | tinylora"),
])
def test_bad_adapter_sections_are_one_line(section, message):
    with pytest.raises(ValueError) as err:
        parse_adapter(section)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_adapter_values_are_converted_like_any_recipe_field():
    """YAML text from an override: '3e-1' (a string to YAML 1.1) is a float, '8' an int."""
    config = parse_adapter({"type": "lora", "r": "8", "lora_dropout": "1e-1", "target_modules": "all-linear"})
    assert (config.r, config.lora_dropout, config.target_modules, config.task_type) == (8, 0.1, "all-linear",
                                                                                       "CAUSAL_LM")


@pytest.mark.parametrize("model", [{"type": "transformer"},
                                   {"from_pretrained": "x", "retrofit": {"type": "titans"}}])
def test_an_adapter_needs_a_saved_base(model):
    with pytest.raises(ValueError, match="adapter: needs model.from_pretrained without retrofit"):
        parse_recipe({"dataset": {}, "model": model, "adapter": ADAPTERS["lora"]})
