"""``memdlm-lm-eval``: lm-evaluation-harness's command line with the ``memdlm`` model type registered
(same arguments as ``lm_eval``; needs the optional ``eval`` extra)."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import lm_eval.__main__ as harness
    except ImportError:
        print("memdlm-lm-eval: error: lm-evaluation-harness is not installed; pip install -e '.[eval]'",
              file=sys.stderr)
        return 2
    import pretrain.eval.lm_eval_model  # noqa: F401  (registers "memdlm")

    harness.cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
