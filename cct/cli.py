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
from pathlib import Path

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


def cmd_train(args: argparse.Namespace) -> None:
    """Train a recipe into a run directory (or resume the run there)."""
    from .train import load_config, train

    cfg = load_config(args.recipe, args.set or [])
    name = Path(args.recipe).stem
    run_dir = Path(args.out) if args.out else Path("runs") / name
    if args.nproc_per_node and args.nproc_per_node > 1:
        _relaunch_with_torchrun(args.nproc_per_node)
        return
    if not args.resume and (run_dir / "last.state.pt").exists():
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it, or --out another folder")
    summary = train(cfg, run_dir, data_root=_data_root(args.data_dir), resume=args.resume, device=args.device)
    print(f"done: {summary['model']} on {summary['dataset']}: final top-1 {summary['final_top1']:.2f}% "
          f"(best {summary['best_top1']:.2f}%), {summary['train_seconds']:.0f} s training, "
          f"{summary['wall_seconds']:.0f} s in all; outputs in {run_dir}")


def _data_root(data_dir: str | None) -> Path:
    from .data.datasets import resolve_data_root

    return resolve_data_root(data_dir)


def _relaunch_with_torchrun(nproc: int) -> None:
    """`cct train --nproc-per-node N ...`: start the same command under torchrun on this machine."""
    import subprocess

    argv = sys.argv[1:]
    cleaned, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc-per-node":
            skip = True
            continue
        if arg.startswith("--nproc-per-node="):
            continue
        cleaned.append(arg)
        del i
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "cct", *cleaned]
    code = subprocess.call(command)
    if code:
        raise CCTError(f"torchrun exited with code {code} (a worker failed; see its message above)")


def cmd_bench(args: argparse.Namespace) -> None:
    """Measure training and inference images/s of a model against this machine's matmul peak."""
    import torch

    from .train import load_config
    from .train.bench import run_bench

    overrides = list(args.set or [])
    for key in ("model", "batch_size", "precision", "img_size", "threads"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    cfg = load_config(args.recipe, overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = run_bench(cfg, device, windows=args.windows)
    if args.json:
        _print_json(result)
        return
    for key, value in result.items():
        print(f"{key:<22}{value}")


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

    p = add("train", cmd_train, "train a recipe (bundled name or YAML path) into a run directory",
            "  cct train keras-example\n  cct train cifar10-fast --set seed=1 --out runs/fast-1\n"
            "  cct train my.yaml --set epochs=2 --set train_samples=512\n  cct train keras-example --resume\n"
            "  cct train keras-example --nproc-per-node 2   # torchrun on this machine")
    p.add_argument("recipe", help="bundled recipe name (see `cct recipes`) or path to a YAML file")
    p.add_argument("--data-dir", help="folder holding the datasets (default: $CCT_DATA, then ./data)")
    p.add_argument("--out", help="run directory (default: runs/RECIPE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in the run directory")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--nproc-per-node", type=int, help="start this many processes with torchrun (DDP)")

    p = add("bench", cmd_bench, "measure training/inference images/s and the fraction of the matmul peak",
            "  cct bench\n  cct bench --model cct_7_3x1_32 --batch-size 128 --precision bf16 --json\n"
            "  cct bench --set stochastic_depth=skip --set drop_path_rate=0.5")
    p.add_argument("--model", help="model name (default: the recipe's)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--img-size", dest="img_size", type=int)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--recipe", default="cifar10-fast", help="recipe giving the augmentation and optimiser")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    p.add_argument("--device", choices=("cpu", "cuda"))
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
