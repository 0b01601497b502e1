"""The `cct` command: one small function per sub-command; errors become one line and an exit code.

Exit codes: 0 success, 1 a problem with data/files/checkpoints (CCTError), 2 a usage error (bad flag, name,
key or value), 130 interrupted. `--debug` shows the full traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import CCTError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_models(args: argparse.Namespace) -> None:
    """List the registered variants with parameters, MACs, input size and classes."""
    from .models import PAPER_TOP1, create_model, list_models
    from .models.complexity import count_macs, count_params

    names = list_models(args.pattern)
    if not names:
        raise UsageError(f"no model matches {args.pattern!r}; `cct models` lists them all")
    rows = []
    for name in names:
        model = create_model(name)
        rows.append(dict(name=name, params=count_params(model), trainable_params=count_params(model, True),
                         macs=count_macs(model), img_size=model.img_size[0], num_classes=model.num_classes,
                         pos_embed=model.pos_embed_kind, paper_top1=PAPER_TOP1.get(name)))
    if args.json:
        _print_json(rows)
        return
    print(f"{'model':<24}{'params':>12}{'GMACs':>9}{'img':>6}{'classes':>9}  paper top-1")
    for r in rows:
        print(f"{r['name']:<24}{r['params']:>12,}{r['macs'] / 1e9:>9.3f}{r['img_size']:>6}{r['num_classes']:>9}"
              f"  {r['paper_top1'] or ''}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (also used to render `--help`)."""
    parser = _Parser(prog="cct", description="Train, evaluate and ship Compact Convolutional Transformers.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n  cct models 'cct_7*'\n  cct train keras-example\n  cct bench --json")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], None], help_text: str, examples: str):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"examples:\n{examples}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("models", cmd_models, "list the model variants with parameter and MAC counts",
            "  cct models\n  cct models 'cct_7*' --json")
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'cct_7*'")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cct` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CCTError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
