"""lm-evaluation-harness with every tto type registered:

    python -m tto.harness --model hf --model_args pretrained=runs/ttt --tasks hellaswag --device cpu

Imports tto (which registers each type with the Auto classes, so ``--model hf`` loads a tto checkpoint
without ``trust_remote_code``) and hands the arguments, unchanged, to lm-eval's own command line.
lm-eval is optional: ``pip install -r requirements-eval.txt``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import tto  # noqa: F401  (registers the Auto classes in this process)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("tto.harness: lm-eval is not installed; pip install -r requirements-eval.txt")
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
