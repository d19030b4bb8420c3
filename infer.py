"""Generate text with a trained model, or with a random-init model of any registered type.

    python infer.py --model runs/quickstart --prompt "The assert statement"
    python infer.py --model runs/quickstart --chat            # multi-turn; the memory state carries over
    python infer.py --config-type titans --variant mag --prompt "hello"

Output is streamed; a tokens/s line goes to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tto.cli import DTYPES, OneLineErrors, resolve_device, tokenizer_spec
from tto.typed import AT_LEAST_1, NON_NEGATIVE, POSITIVE, SEED, Bound, flag


#: --config-type T builds the model of configs/tiny/T.yml (every registered type has one; CI checks)
TINY_CONFIGS = Path(__file__).resolve().parent / "configs" / "tiny"


def parse_args(argv):
    p = OneLineErrors(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", help="directory of a trained model (config.json + model.safetensors)")
    src.add_argument("--config-type", help="registered type to build with random weights")
    src.add_argument("--variant", help="variant of --config-type")
    p.add_argument("--tokenizer", help="builtin:bytes, a directory or a hub name (default: the model's own, else builtin:bytes)")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--seed", type=flag(int, SEED), default=0)
    p.add_argument("--max_new_tokens", type=flag(int, AT_LEAST_1), default=200)
    p.add_argument("--temperature", type=flag(float, NON_NEGATIVE), default=0.8, help="0 for greedy decoding")
    p.add_argument("--top_k", type=flag(int, NON_NEGATIVE), default=50, help="0: no top-k filter")
    p.add_argument("--top_p", type=flag(float, Bound(low=0, high=1, low_open=True)), default=1.0)
    p.add_argument("--min_p", type=flag(float, Bound(low=0, high=1)), default=None)
    p.add_argument("--repetition_penalty", type=flag(float, POSITIVE), default=1.0)
    p.add_argument("--prompt", help="generate once from this prompt (otherwise it asks)")
    p.add_argument("--chat", action="store_true", help="multi-turn: the model's state persists across turns")
    p.add_argument("--history", type=int, default=None,
                   help="with --chat: re-read only the last N turns as text each turn (for models without a persistent state)")
    args = p.parse_args(argv)

    import tto

    if (args.model is None) == (args.config_type is None):
        p.error("give exactly one of --model DIR and --config-type TYPE")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model!r}: no config.json there (a directory written by train.py or save_pretrained)")
    if args.variant is not None and args.config_type is None:
        p.error("--variant needs --config-type")
    if args.config_type is not None:
        try:
            entry = tto.get(args.config_type)
        except ValueError as err:
            p.error(str(err))
        if args.variant is not None and args.variant not in entry.variants:
            p.error(f"unknown variant {args.variant!r} of {args.config_type!r}; valid: {list(entry.variants) or 'none'}")
    if args.history is not None and not args.chat:
        p.error("--history only applies with --chat")
    return args, p


def load(args):
    import torch
    from transformers import AutoModelForCausalLM

    import tto
    from tto.data import load_tokenizer
    from tto.training import load_recipe

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    tokenizer = load_tokenizer(tokenizer_spec(args.model, args.tokenizer))
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        entry = tto.get(args.config_type)
        fields = {k: v for k, v in load_recipe(TINY_CONFIGS / f"{args.config_type}.yml").model.items() if k != "type"}
        if args.variant is not None:
            fields[entry.config_class.variant_field] = args.variant
        fields.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(args.seed)
        model = entry.model_class(tto.build_config(args.config_type, **fields)).to(dtype)
    return model.to(device).eval(), tokenizer, device


def generate(model, tokenizer, ids, cache, args):
    """Stream a continuation of `ids` (the cache holds what was already read); returns the new ids."""
    import torch
    from transformers import TextStreamer

    sampling = args.temperature > 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling, repetition_penalty=args.repetition_penalty,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if sampling:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, use_cache=True,
                             streamer=TextStreamer(tokenizer, skip_prompt=True), **kwargs)
    new = out.shape[1] - ids.shape[1]
    print(f"[{new} tokens, {new / (time.perf_counter() - start):.1f} tokens/s]", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    import torch

    from transformers import DynamicCache

    from tto import TTOCache
    from tto.modeling import TTOPreTrainedModel

    torch.manual_seed(args.seed)
    try:  # a tokenizer or model that cannot be loaded: one line, like a usage error
        model, tokenizer, device = load(args)
    except (OSError, ValueError) as err:
        parser.error(str(err).splitlines()[0])
    encode = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)  # noqa: E731
    if not args.chat:
        prompt = args.prompt if args.prompt is not None else input("prompt> ")
        generate(model, tokenizer, encode(prompt), None, args)
        print()
        return 0
    if isinstance(model, TTOPreTrainedModel):  # fast weights + bounded KV: the state of the whole conversation
        new_cache = lambda: TTOCache(model.config.num_hidden_layers)  # noqa: E731
    else:  # any other causal LM keeps its own (growing) KV cache across turns
        new_cache = lambda: DynamicCache(config=model.config)  # noqa: E731
    cache, ids, turns = new_cache(), None, []
    first = args.prompt
    while True:
        try:
            text = first if first is not None else input("you> ")
        except EOFError:
            return 0
        first = None
        turn = f"User: {text}\nAssistant:"
        if args.history is not None:  # re-read the last N turns from scratch
            turns = (turns + [turn])[-args.history :]
            cache = new_cache()
            ids = encode("\n".join(turns))
        else:  # the state already holds everything said so far: feed only the new turn
            new = encode(("\n" if ids is not None else "") + turn)
            ids = new if ids is None else torch.cat([ids, new], dim=1)
        out = generate(model, tokenizer, ids, cache, args)
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        if args.history is not None:
            turns[-1] += reply
        ids = out
        print()


if __name__ == "__main__":
    sys.exit(main())
