"""Generate text with a trained model, or with a random-init model of any registered type.

    python infer.py --model runs/quickstart --prompt "The assert statement"
    python infer.py --model runs/quickstart --chat            # multi-turn; the memory state carries over
    python infer.py --adapter runs/sft_lora --chat             # a peft adapter over the base it records
    python infer.py --config-type titans --variant mag --prompt "hello"

Output is streamed. A long prompt is read in pieces (tto.modeling.PREFILL_CHUNK_TOKENS tokens each),
so a memory model's peak memory does not grow with it; a line on stderr gives the prefill and the
decode speed. Ctrl-C stops the reply being written (with --chat: back to the prompt); Ctrl-D (end
of input) or Ctrl-C at the prompt ends. Prompt bytes that are not UTF-8 are replaced by U+FFFD.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from tto.cli import DTYPES, OneLineErrors, resolve_device, resolve_model, tokenizer_spec
from tto.typed import AT_LEAST_1, NON_NEGATIVE, POSITIVE, SEED, Bound, flag


#: turns a model without a memory re-reads each turn with --chat (the default of --history)
CHAT_HISTORY = 5

#: --config-type T builds the model of configs/tiny/T.yml (every registered type has one; CI checks)
TINY_CONFIGS = Path(__file__).resolve().parent / "configs" / "tiny"


def parse_args(argv):
    p = OneLineErrors(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", help="directory of a trained model (config.json + model.safetensors)")
    src.add_argument("--config-type", help="registered type to build with random weights")
    src.add_argument("--variant", help="variant of --config-type")
    p.add_argument("--adapter", help="a peft adapter directory (train.py with an adapter section), loaded over its "
                                     "base: --model, else the base the adapter records")
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
    p.add_argument("--chat", action="store_true",
                   help="multi-turn, in the tokenizer's chat template: a memory model's state persists across turns")
    p.add_argument("--history", type=flag(int, AT_LEAST_1), default=None,
                   help=f"with --chat: re-read only the last N turns each turn (default: {CHAT_HISTORY} for models "
                        f"without a memory, which re-read; a memory model keeps its state and reads only the new turn)")
    args = p.parse_args(argv)

    import tto

    if args.adapter is None and (args.model is None) == (args.config_type is None):
        p.error("give exactly one of --model DIR and --config-type TYPE")
    if args.adapter is not None and args.config_type is not None:
        p.error("--adapter loads over a saved base (--model DIR or the one it records), not --config-type")
    try:
        resolve_device(args.device)
        if args.adapter is not None:
            from tto.adapters import read_adapter_config

            read_adapter_config(args.adapter)
        elif args.model is not None:
            args.model = resolve_model(args.model)
    except ValueError as err:
        p.error(str(err))
    if args.variant is not None and args.config_type is None:
        p.error("--variant needs --config-type")
    if args.config_type is not None:
        try:
            entry = tto.get(args.config_type)
        except ValueError as err:
            p.error(str(err))
        if entry.task != "causal-lm":
            p.error(f"type {args.config_type!r} is an {entry.task} model; infer.py writes text with the language-model "
                    f"types: {sorted(tto.available())}")
        if args.variant is not None and args.variant not in entry.variants:
            p.error(f"unknown variant {args.variant!r} of {args.config_type!r}; valid: {list(entry.variants) or 'none'}")
    if args.history is not None and not args.chat:
        p.error("--history only applies with --chat")
    if args.prompt == "":
        p.error("--prompt is empty: give some text to continue")
    return args, p


def load(args, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    import tto
    from tto.training import load_recipe

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.adapter is not None:
        from tto.adapters import load_adapted

        model = load_adapted(args.adapter, args.model, dtype)
    elif args.model is not None:
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
    return model.to(device).eval(), device


class StopOnCtrlC:
    """While a reply is written, Ctrl-C stops it after the current token (or prompt piece), leaving the
    cache consistent with the tokens read; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.pressed = False

    def __enter__(self):
        self.pressed = False
        self.installed = threading.current_thread() is threading.main_thread()  # signals reach only it
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)

    def criteria(self):
        """This as a `generate` stopping criterion."""
        import torch
        from transformers import StoppingCriteria

        stop = self

        class Pressed(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.pressed, dtype=torch.bool, device=input_ids.device)

        return [Pressed()]


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens} tokens, {tokens / seconds:.1f} tokens/s" if tokens and seconds > 0 else f"{tokens} tokens"


def generate(model, tokenizer, ids, cache, args):
    """Stream a continuation of `ids` (the cache holds what was already read). Returns the ids read and
    written (when Ctrl-C stopped the prefill: the part of `ids` read) and whether Ctrl-C stopped it."""
    import torch
    from transformers import TextStreamer

    from tto.modeling import PREFILL_CHUNK_TOKENS

    sampling = args.temperature > 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling, repetition_penalty=args.repetition_penalty,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if sampling:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    with StopOnCtrlC() as ctrl_c, torch.no_grad():
        start, read = time.perf_counter(), cache.get_seq_length()
        for piece in range(read, ids.shape[1] - 1, PREFILL_CHUNK_TOKENS):  # all but the last token: generate reads it
            if ctrl_c.pressed:
                print(f"[stopped while reading the prompt, after {piece} of {ids.shape[1]} tokens]", file=sys.stderr)
                return ids[:, :piece], True
            model(ids[:, piece : min(piece + PREFILL_CHUNK_TOKENS, ids.shape[1] - 1)], past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
        prefilled, decode_start = cache.get_seq_length() - read, time.perf_counter()
        out = model.generate(ids, past_key_values=cache, use_cache=True, stopping_criteria=ctrl_c.criteria(),
                             streamer=TextStreamer(tokenizer, skip_prompt=True), **kwargs)
        end = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    stopped = " (stopped by Ctrl-C)" if ctrl_c.pressed else ""
    print(f"[prefill: {rate(prefilled, decode_start - start)}; decode: {rate(new, end - decode_start)}{stopped}]",
          file=sys.stderr, flush=True)
    return out, ctrl_c.pressed


def as_utf8(text: str, where: str) -> str:
    """`text` with the bytes that were not UTF-8 (surrogate escapes from argv or stdin) replaced by
    U+FFFD; a note on stderr says so."""
    try:
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates that no byte produced
        fixed = text.encode("utf-8", "replace").decode("utf-8")
    if fixed != text:
        print(f"infer.py: note: the {where} is not valid UTF-8; its invalid bytes were replaced by U+FFFD",
              file=sys.stderr)
    return fixed


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    if hasattr(sys.stdin, "reconfigure") and not sys.stdin.closed:  # bytes that are not UTF-8 reach as_utf8
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        return run(args, parser)
    except KeyboardInterrupt:  # Ctrl-C at the prompt, or a second one while writing
        print(file=sys.stderr)
        return 130


def ask(label: str) -> str | None:
    """A line from stdin (None at end of input), with non-UTF-8 bytes replaced."""
    try:
        return as_utf8(input(label), "input")
    except EOFError:
        print()
        return None


def keeps_memory(model) -> bool:
    """Whether `model` carries the past in a state of its own (a tto model with a layer that is not
    softmax attention); other models re-read the conversation."""
    from tto.modeling import TTOPreTrainedModel

    return isinstance(model, TTOPreTrainedModel) and any(kind != "transformer" for kind in model.config.layer_mixers)


def last_turns(messages: list[dict], n: int) -> list[dict]:
    """The system message (if any) and the messages from the n-th last user message on."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    system = [m for m in messages[:1] if m["role"] == "system"]
    return system + messages[users[-n] if len(users) >= n else len(system) :]


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(args, parser) -> int:
    import torch
    from safetensors import SafetensorError
    from transformers import DynamicCache

    from tto import TTOCache
    from tto.data import load_tokenizer
    from tto.data.chat import render
    from tto.modeling import TTOPreTrainedModel

    try:  # a tokenizer or model that cannot be loaded: one line, like a usage error
        tokenizer = load_tokenizer(tokenizer_spec(args.adapter or args.model, args.tokenizer))
    except (OSError, ValueError) as err:
        parser.error(str(err).splitlines()[0])
    prompt = None if args.prompt is None else as_utf8(args.prompt, "prompt")
    if not args.chat and prompt is None:  # asked before the model is loaded, so a bad one costs nothing
        prompt = ask("prompt> ")
        if prompt is None:
            return 0
        if not prompt:
            parser.error("the prompt is empty: give some text to continue")
    torch.manual_seed(args.seed)
    try:
        model, device = load(args, tokenizer)
    except (OSError, ValueError, SafetensorError) as err:
        parser.error(str(err).splitlines()[0])
    encode = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)  # noqa: E731
    if isinstance(model, TTOPreTrainedModel):  # fast weights + bounded KV: the state of the whole conversation
        new_cache = lambda: TTOCache(model.config.num_hidden_layers)  # noqa: E731
    else:  # any other causal LM keeps its own (growing) KV cache across turns
        new_cache = lambda: DynamicCache(config=model.config)  # noqa: E731
    if not args.chat:
        ids = encode(prompt)
        if ids.shape[1] == 0:
            parser.error(f"the prompt {prompt!r} is no tokens for this tokenizer: give some text to continue")
        _, stopped = generate(model, tokenizer, ids, new_cache(), args)
        print()
        return 130 if stopped else 0
    rereads = args.history is not None or not keeps_memory(model)
    cache, ids, messages, read = new_cache(), None, [], ""
    while True:
        text, prompt = (prompt, None) if prompt is not None else (ask("you> "), None)
        if text is None:
            return 0
        if not text.strip():
            print("(empty message: type something, or end with Ctrl-D)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        if rereads:  # re-read the last N turns from scratch
            messages = last_turns(messages, args.history or CHAT_HISTORY)
            cache = new_cache()
            ids = encode(render(tokenizer, messages, prompt=True))
        else:  # the state already holds everything said so far: feed only what is new
            shown = render(tokenizer, messages, prompt=True)
            new = encode(shown[common_prefix(read, shown) :])
            ids = new if ids is None else torch.cat([ids, new], dim=1)
        out, _ = generate(model, tokenizer, ids, cache, args)
        messages.append({"role": "assistant",
                         "content": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)})
        read = tokenizer.decode(out[0], clean_up_tokenization_spaces=False)  # what the cache holds
        ids = out
        print()

if __name__ == "__main__":
    sys.exit(main())
