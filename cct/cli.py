"""The `cct` command: one small function per sub-command; errors become one line and an exit code.

Exit codes: 0 success, 1 a problem with data/files/checkpoints (CCTError), 2 a usage error (bad flag, name,
key or value; also a setting above this machine's bounds), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
`--debug` shows the full traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import __version__
from .errors import CCTError, UsageError

# the choices of --device and --precision, here rather than imported so that `cct --help` does not load torch
# (PRECISIONS: the values of the recipe key `precision`)
DEVICES = ("cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (and <= `maximum`, a bound of this machine); anything else is a
    one-line usage error naming the option."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum} on this machine, got {value}")
        return value

    parse.__name__ = "int"  # argparse's message for a non-number: "invalid int value"
    return parse


def _finite_or_null(obj: object) -> object:
    """`obj` with every NaN or infinite float replaced by None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def _print_json(obj: object) -> None:
    """Print strict JSON (NaN and infinities as null, which every JSON reader accepts)."""
    sys.stdout.write(json.dumps(_finite_or_null(obj), indent=2, allow_nan=False) + "\n")


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
    from .data.prepared import dataset_info, ensure_dataset
    from .train import load_config, train
    from .train.config import check_crop_fits
    from .train.loop import check_resumable
    from .train.runs import resolve_weights, run_records
    from .train.state import claim_fresh_run_dir

    cfg = load_config(args.recipe, args.set or [])
    check_crop_fits(cfg)
    name = Path(args.recipe).stem
    run_dir = Path(args.out) if args.out else Path("runs") / name
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if args.resume and run_dir.is_dir():  # checked by train() too; here before any worker starts
        check_resumable(cfg, run_records(run_dir)[1] or {}, run_dir)
    cpu_launch = _cpu_launch(args.device)  # also refuses a GPU that is not there, before any process starts
    args.interrupt_hint = _resume_hint(run_dir)
    data_root = _data_root(args.data_dir)
    if not _under_torchrun():  # the launching process: once, before any worker starts
        ensure_dataset(cfg.dataset, ("train", dataset_info(cfg.dataset).eval_split), data_root,
                       download=args.download)
        if cfg.init != "none" and not args.resume:  # fetched once, before any worker (a resume needs none)
            resolve_weights(cfg.init)
    elif args.download:  # every process of a torchrun started by hand would download at once
        raise UsageError("--download under torchrun: let `cct train --nproc-per-node N` start the processes (it "
                         "downloads once, before them), or download the dataset first")
    if not args.resume and not os.environ.get(_STARTED_BY_CCT) and os.environ.get("RANK", "0") == "0":
        claim_fresh_run_dir(run_dir, args.overwrite)  # once, in the launching process
    nproc = args.nproc_per_node or (cfg.processes if cpu_launch else 1)
    if nproc > 1:
        _relaunch_with_torchrun(nproc, args.argv, share_cores=cpu_launch, on_failure=args.interrupt_hint)
        return
    _retain_freed_memory(_device(args.device))
    summary = train(cfg, run_dir, data_root=data_root, resume=args.resume, device=args.device)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    print(f"done: {summary['model']} on {summary['dataset']}: final top-1 {summary['final_top1']:.2f}% "
          f"(best {summary['best_top1']:.2f}%), {summary['train_seconds']:.0f} s training, "
          f"{summary['wall_seconds']:.0f} s in all; outputs in {run_dir}")


def _device(name: str | None):
    """The torch device of a `--device` option (default: CUDA where there is a GPU); one line, not a driver
    traceback, where `--device cuda` or `--device mps` names a device this machine (or this PyTorch) lacks."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: no Apple GPU (MPS) is available to this PyTorch (use --device cpu)")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _retain_freed_memory(device) -> None:
    """On a CPU, keep freed memory in this process (see `cct.train.loop.retain_freed_memory`): a process-wide
    setting, so the commands choose it, not the library."""
    from .train.loop import retain_freed_memory

    if device.type == "cpu":
        retain_freed_memory()


def _under_torchrun() -> bool:
    """Whether this process is a worker of a torchrun job (one that `cct` started, or one started by hand)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _cpu_launch(device: str | None) -> bool:
    """Whether a recipe's `processes` applies: a CPU run started by hand (not yet under torchrun). On GPUs the
    process count is one per GPU, chosen with --nproc-per-node."""
    return _device(device).type == "cpu" and not _under_torchrun()


def _data_root(data_dir: str | None) -> Path:
    from .data.datasets import resolve_data_root

    return resolve_data_root(data_dir)


_STARTED_BY_CCT = "CCT_TORCHRUN_WORKER"  # set for the workers of a torchrun that `cct` starts itself


def _resume_hint(run_dir: Path) -> Callable[[], str]:
    """What to add when a training worker failed: how to go on, once the run has saved a checkpoint."""
    return lambda: (": the last checkpoint is kept, run the same command with --resume to continue"
                    if (run_dir / "last.state.pt").exists() else "")


def _relaunch_with_torchrun(nproc: int, argv: list[str], share_cores: bool,
                            on_failure: Callable[[], str] = lambda: "") -> None:
    """`cct train --nproc-per-node N ...`: run the same command under torchrun on this machine (the launcher
    runs in this process, like `python -m torch.distributed.run --standalone`, so that a failed worker becomes
    one line here instead of torchrun's report, ending with `on_failure()`)."""
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .train.distributed import LAUNCHER_PID

    if _under_torchrun():
        raise UsageError("--nproc-per-node starts torchrun itself: under torchrun, leave it out "
                         "(torchrun's own --nproc-per-node sets the processes)")
    cleaned, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node=") and arg != "--download":  # the launcher downloaded already
            cleaned.append(arg)
    # intra-op threads per process: on a CPU the cores shared out over the processes (1 each on 2 cores; an 8-core
    # laptop running `processes: 2` gets 4 each instead of leaving 6 cores idle), elsewhere torchrun's default of 1
    # (the GPU does the work; DataLoader workers want the cores). Set here, which also skips torchrun's banner;
    # `--set threads=K` or OMP_NUM_THREADS choose otherwise.
    threads = max(1, (os.cpu_count() or 1) // nproc) if share_cores else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ[_STARTED_BY_CCT] = "1"  # its workers leave the "interrupted" line to this process
    os.environ[LAUNCHER_PID] = str(os.getpid())  # its workers die with this process (`die_with_launcher`)
    # torchrun's "sending SIGTERM", "failed" and "Received 2 death signal" lines: the one line below says it (its
    # modules' loggers carry their own levels, so each one is silenced, not only their parent)
    elastic_logs = [logging.getLogger(name) for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]
                    if name.startswith("torch.distributed.elastic")]
    levels = [log.level for log in elastic_logs]
    for log in elastic_logs:
        log.setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "cct", *cleaned]))
    except ChildFailedError as e:
        first, _ = e.get_first_failure()
        how = [f"rank {r} {'killed by ' + f.signal_name() if f.exitcode < 0 else f'exited with code {f.exitcode}'}"
               for r, f in sorted(e.failures.items(), key=lambda item: item[0] != first)]
        raise CCTError(f"a worker failed ({', '.join(how)}; the first is the cause, torchrun stops the others)"
                       f"{on_failure()}") from None
    except SignalException as e:  # torchrun's own handlers caught the signal and stopped the workers
        raise (Terminated() if e.sigval == signal.SIGTERM else KeyboardInterrupt()) from e
    finally:
        os.environ.pop(_STARTED_BY_CCT, None)
        os.environ.pop(LAUNCHER_PID, None)
        for log, level in zip(elastic_logs, levels, strict=True):
            log.setLevel(level)


def cmd_bench(args: argparse.Namespace) -> None:
    """Measure training and inference images/s of a model against this machine's matmul peak."""
    import torch

    from .train import distributed as dist
    from .train import load_config
    from .train.bench import run_bench

    # the model, batch and threads of the command line (defaults: the speed targets' cct_2_3x2_32, batch 128, the
    # cores shared out over the processes), never the recipe's: the recipe gives the augmentation, the optimiser
    # and the process layout
    overrides = [*(args.set or []), f"model={args.model}"]
    overrides += [f"{key}={getattr(args, key)}" for key in ("precision", "img_size") if getattr(args, key) is not None]
    # checked against the memory with the image size (bench runs no evaluation: its batch stands for both)
    overrides += [f"batch_size={args.batch_size}", f"eval_batch_size={args.batch_size}"]
    cfg = load_config(args.recipe, overrides)  # checked here, before any worker starts
    device, cpu_launch = _device(args.device), _cpu_launch(args.device)
    nproc = args.nproc_per_node or (cfg.processes if cpu_launch else 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the processes of a running torchrun job (this one among them)
    if args.batch_size % max(nproc, world):
        raise UsageError(f"--batch-size {args.batch_size} does not split over {max(nproc, world)} processes")
    if nproc > 1:
        _relaunch_with_torchrun(nproc, args.argv, share_cores=cpu_launch)
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    cfg = load_config(args.recipe, [*overrides, f"batch_size={args.batch_size // world}", f"threads={threads}"])
    torch.set_num_threads(cfg.threads)
    _retain_freed_memory(device)
    dist.setup(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", dist.local_rank())
    result = run_bench(cfg, device, windows=args.windows)
    if dist.rank() != 0:
        return
    if args.json:
        _print_json(result)
        return
    for key, value in result.items():
        print(f"{key:<22}{value}")


def cmd_recipes(args: argparse.Namespace) -> None:
    """List the bundled recipes with their model, dataset and epochs."""
    import yaml

    from .train import bundled_recipes

    rows = []
    for name, path in sorted(bundled_recipes().items()):
        data = yaml.safe_load(path.read_text()) or {}
        rows.append(dict(name=name, model=data.get("model"), dataset=data.get("dataset"),
                         epochs=data.get("epochs"), path=str(path)))
    if args.json:
        _print_json(rows)
        return
    for r in rows:
        print(f"{r['name']:<18}{r['model']:<20}{r['dataset']:<12}{r['epochs']:>5} epochs")


def cmd_prepare(args: argparse.Namespace) -> None:
    """Convert a file dataset once into a prepared store of pre-resized pixels (`prepared:OUT` in training)."""
    from .data.prepared import prepare_dataset

    metas = prepare_dataset(args.dataset, args.size, args.output, root=_data_root(args.data_dir),
                            overwrite=args.overwrite, workers=args.workers, val_fraction=args.val_fraction,
                            seed=args.seed, flowers_split=args.flowers_split)
    counts = ", ".join(f"{split} {m['count']} images ({m['skipped']} bad skipped)" for split, m in metas.items())
    print(f"prepared {args.dataset} at {args.size} px into {args.output}: {counts}; train on it with "
          f"--set dataset=prepared:{args.output}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a trained model on a dataset's test split: top-1, top-5, loss, per-class accuracy."""
    from .train import evaluate_checkpoint

    device = _device(args.device)
    _retain_freed_memory(device)
    report = evaluate_checkpoint(
        _weights_source(args), args.dataset, model_name=args.model, data_root=_data_root(args.data_dir),
        download=args.download, precision=args.precision, batch_size=args.batch_size, workers=args.workers,
        flip=args.flip, shift=args.shift, compile=args.compile, device=device, out=Path(args.out) if args.out else None)
    if args.json:
        _print_json(report)
        return
    print(f"{report['model']} on {report['dataset']}/{report['split']} ({report['images']} images): "
          f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}")
    for name, acc in report["per_class_top1"].items():
        print(f"  {name:<24}{acc:6.2f}%")


def cmd_predict(args: argparse.Namespace) -> None:
    """Classify image files with a trained model."""
    model, meta = _model_for_images(args)
    results, unreadable = [], []
    for readable in _image_batches(args.images, model.img_size[0], unreadable):
        batch_results = _classify(model, meta, readable, args.topk)
        if args.json:
            results += batch_results
        else:
            for r in batch_results:
                print(r["image"])
                for p in r["predictions"]:
                    print(f"  {p['probability'] * 100:6.2f}%  {p['label']}")
    if args.json:
        _print_json(results)
    _report_unreadable(unreadable)


def _model_for_images(args: argparse.Namespace):
    """The trained model and metadata of `cct predict`-style arguments (CHECKPOINT IMAGE... or --pretrained
    IMAGE...); leaves the image paths alone in `args.images`."""
    if args.pretrained is None:
        if len(args.images) < 2:
            raise UsageError("give a CHECKPOINT and at least one image")
        args.checkpoint, args.images = args.images[0], args.images[1:]
    else:
        args.checkpoint = None
    from .kernels import accelerate
    from .train.runs import load_trained

    _retain_freed_memory(_device("cpu"))
    model, meta = load_trained(_weights_source(args), args.model)
    return accelerate(model), meta  # its kernels run where they apply (bf16); PyTorch's run elsewhere


def _read_images(paths: list[str], img_size: int) -> tuple[list, list[str]]:
    """(path, uint8 image as the model sees it) of every readable file, and one message per unreadable one:
    like `cat` or `file`, every image that can be read is processed."""
    from .data.datasets import eval_transform

    transform = eval_transform(img_size, crop_pct=1.0)
    readable, unreadable = [], []
    for path in paths:
        try:
            readable.append((path, transform(_decode(path))))
        except CCTError as e:
            unreadable.append(str(e))
    return readable, unreadable


IMAGE_BATCH = 64  # images decoded and processed at a time by `cct predict` and `cct explain`: memory stays bounded


def _image_batches(paths: list[str], img_size: int, unreadable: list[str]) -> Iterator[list]:
    """The readable (path, image) pairs of `paths`, `IMAGE_BATCH` files at a time, in order; the message of each
    unreadable file is appended to `unreadable`."""
    for start in range(0, len(paths), IMAGE_BATCH):
        readable, bad = _read_images(paths[start:start + IMAGE_BATCH], img_size)
        unreadable += bad
        if readable:
            yield readable


def _report_unreadable(unreadable: list[str]) -> None:
    """One `error:` line per unreadable image, the last one as the command's error (exit 1)."""
    for message in unreadable[:-1]:
        print(f"error: {message}", file=sys.stderr)
    if unreadable:
        raise CCTError(unreadable[-1])


def _classify(model, meta: dict, images: list, topk: int) -> list[dict]:
    """The top-k labels and probabilities of each (path, uint8 image) pair, in order."""
    import torch

    from .data.augment import normalize

    batch = torch.stack([image for _, image in images])
    with torch.no_grad():
        probs = model(normalize(batch, meta["mean"], meta["std"])).float().softmax(dim=1)
    top = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [dict(image=_shown(path), predictions=_labelled(values, idx, meta["classes"]))
            for (path, _), values, idx in zip(images, top.values, top.indices, strict=True)]


def _labelled(probabilities, indices, classes: list[str]) -> list[dict]:
    """One image's top-k as [{label, probability}], highest first."""
    return [dict(label=classes[i], probability=round(p, 6))
            for p, i in zip(probabilities.tolist(), indices.tolist(), strict=True)]


def cmd_explain(args: argparse.Namespace) -> None:
    """Draw where a trained model looked in each image: its sequence-pooling and attention-rollout maps."""
    model, meta = _model_for_images(args)
    pngs = _explain_outputs(args.images, Path(args.out))
    results, unreadable = [], []
    for readable in _image_batches(args.images, model.img_size[0], unreadable):
        results += _explain_batch(model, meta, readable, pngs, args.topk)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            best = r["predictions"][0]
            print(f"{r['image']}: {best['label']} {best['probability'] * 100:.2f}%  -> {r['png']}")
    _report_unreadable(unreadable)


def _explain_batch(model, meta: dict, readable: list, pngs: dict[str, Path], topk: int) -> list[dict]:
    """Explain one batch of (path, image), draw each image's PNG and return their JSON records."""
    import torch

    from .data.augment import normalize
    from .models.explain import explain, save_explanation_png

    batch = torch.stack([image for _, image in readable])
    explanation = explain(model, normalize(batch, meta["mean"], meta["std"]), topk)
    results = []
    for i, (path, image) in enumerate(readable):
        try:
            pngs[path].parent.mkdir(parents=True, exist_ok=True)
            save_explanation_png(pngs[path], image, explanation, i, meta["classes"])
        except OSError as e:
            raise CCTError(f"cannot write {pngs[path]}: {e.strerror or e}") from None
        results.append(dict(image=_shown(path), png=str(pngs[path]), pooling=explanation.pooling_kind,
                            pooling_shape=list(explanation.pooling.shape[1:]),
                            rollout_shape=list(explanation.rollout.shape[1:]),
                            predictions=_labelled(explanation.top_probs[i], explanation.top_classes[i],
                                                  meta["classes"])))
    return results


def _explain_outputs(images: list[str], out: Path) -> dict[str, Path]:
    """The PNG each image's explanation goes to, `out/<stem>.png`; two images of the same stem are a usage
    error, found before anything is written."""
    pngs: dict[str, Path] = {}
    for path in images:
        png = out / f"{Path(path).stem}.png"
        if png in pngs.values() and path not in pngs:
            raise UsageError(f"two images would both be drawn to {png}: give them different file names")
        pngs[path] = png
    return pngs


def _shown(path: str) -> str:
    """A file name as printable text: bytes that are not UTF-8 (kept by Python as lone surrogates, which a
    UTF-8 stream refuses) are written as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _weights_source(args: argparse.Namespace) -> str:
    """CHECKPOINT (anything `cct.train.runs.resolve_weights` accepts), or MODEL.TAG from --model and
    --pretrained TAG (shipped weights or an official checkpoint)."""
    if args.pretrained is None:
        if args.checkpoint is None:
            raise UsageError("give a CHECKPOINT, or --model NAME --pretrained TAG for shipped weights")
        return args.checkpoint
    if args.model is None:
        raise UsageError("--pretrained needs --model NAME")
    return f"{args.model}.{args.pretrained}"


def _decode(path: str):
    """One image file as a uint8 tensor, or a one-line CCTError naming the file."""
    from .data.datasets import BadImage, decode_image_file

    try:
        return decode_image_file(path)
    except BadImage as e:
        raise CCTError(f"{path}: {e}") from None


def cmd_demo(args: argparse.Namespace) -> None:
    """Serve a web page where people try a trained model on their own images (needs Gradio)."""
    from .demo import serve

    serve(_weights_source(args), args.model, host=args.host, port=args.port, share=args.share)


def cmd_export(args: argparse.Namespace) -> None:
    """Export a trained model to ONNX (dynamic batch), safetensors or TorchScript."""
    from .train.runs import export_trained

    if not args.output.strip():
        raise UsageError("-o/--output: give the file to write")
    out = export_trained(_weights_source(args), args.format, Path(args.output), model_name=args.model,
                         overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_push(args: argparse.Namespace) -> None:
    """Upload a trained model to the Hugging Face Hub as a timm-compatible model folder."""
    import tempfile

    from .models.hub import is_hub_folder, push_to_hub
    from .train.runs import export_trained

    if is_hub_folder(args.checkpoint):
        url = push_to_hub(Path(args.checkpoint), args.repo_id, args.token)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_trained(args.checkpoint, "hub", Path(tmp) / "model", model_name=args.model)
            url = push_to_hub(folder, args.repo_id, args.token)
    print(f"pushed to {url}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (also used to render `--help`)."""
    from .train.config import machine_limits

    limits = machine_limits()
    processes, threads, img_size = limits.processes, limits.threads, limits.img_size
    batch = limits.batch_size(16)  # a bound for any image size; the size-aware check follows where it is known
    parser = _Parser(prog="cct", description="Train, evaluate and ship Compact Convolutional Transformers.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n  cct models 'cct_7*'\n  cct train keras-example\n  cct bench --json")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    p.add_argument("--download", action="store_true",
                   help="download the dataset into the data folder first if it is missing (CIFAR, Flowers-102)")
    p.add_argument("--out", help="run directory (default: runs/RECIPE)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in the run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds another run, deleting that run's files")
    p.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    p.add_argument("--nproc-per-node", type=_at_least(1, processes),
                   help="start this many processes with torchrun (DDP); default: the recipe's `processes`")

    p = add("bench", cmd_bench, "measure training/inference images/s and the fraction of the matmul peak",
            "  cct bench\n  cct bench --model cct_7_3x1_32 --batch-size 128 --precision bf16 --json\n"
            "  cct bench --nproc-per-node 1   # one process, every core\n"
            "  cct bench --set compile=true    # compiled blocks for training, whole model (frozen) for inference\n"
            "  cct bench --set stochastic_depth=skip --set drop_path_rate=0.5")
    p.add_argument("--model", default="cct_2_3x2_32")
    p.add_argument("--batch-size", dest="batch_size", type=_at_least(1, batch), default=128)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision (default: the recipe's, auto: bf16 where computed natively, else fp32)")
    p.add_argument("--img-size", dest="img_size", type=_at_least(1, img_size))
    p.add_argument("--threads", type=_at_least(1, threads),
                   help="torch intra-op threads per process (default: the cores shared out over the processes)")
    p.add_argument("--nproc-per-node", type=_at_least(1, processes),
                   help="DDP processes under torchrun, sharing --batch-size (default on a CPU: the recipe's "
                        "`processes`, as `cct train` runs it)")
    p.add_argument("--recipe", default="cifar10-fast",
                   help="recipe giving the augmentation, optimiser and process layout")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--windows", type=_at_least(1), default=5, help="timed windows (the median is reported)")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = add("recipes", cmd_recipes, "list the bundled recipes", "  cct recipes\n  cct recipes --json")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = add("prepare", cmd_prepare, "convert a file dataset once into pre-resized pixels read without decoding",
            "  cct prepare imagenet --size 72 -o imagenet72\n  cct prepare folder:photos --size 128 -o photos128\n"
            "  cct train imagenet64-cct --set dataset=prepared:imagenet72")
    p.add_argument("dataset", help="imagenet, flowers102 or folder:PATH (as in training)")
    p.add_argument("--size", type=_at_least(1), required=True,
                   help="side of the stored squares (shorter side resized to it, central square kept)")
    p.add_argument("-o", "--output", required=True, help="the store's folder (train/ and val/ inside)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (never another folder)")
    p.add_argument("--data-dir", help="folder holding the datasets (default: $CCT_DATA, then ./data)")
    p.add_argument("--workers", type=_at_least(0), default=4, help="decoding processes")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of each class held out as val, for a folder without a val/ split")
    p.add_argument("--seed", type=int, default=0, help="seed of that held-out split (as the recipe's `seed`)")
    p.add_argument("--flowers-split", choices=("official", "cct"), default="cct")

    p = add("eval", cmd_eval, "evaluate a trained model (weights file or run directory) on a test split",
            "  cct eval runs/keras-example\n  cct eval runs/keras-example/best.safetensors --json --out report/")
    p.add_argument("checkpoint", nargs="?", help="a .safetensors weights file, a run directory, a Hub folder, "
                   "an official .pth, hf-hub:ORG/NAME or MODEL.TAG")
    p.add_argument("--model", help="architecture name, for files that do not record it (official .pth)")
    p.add_argument("--pretrained", metavar="TAG",
                   help="use the weights TAG of --model (shipped, e.g. cifar10, or official)")
    p.add_argument("--dataset", help="dataset name (default: the one the model was trained on)")
    p.add_argument("--data-dir", help="folder holding the datasets (default: $CCT_DATA, then ./data)")
    p.add_argument("--download", action="store_true",
                   help="download the dataset into the data folder first if it is missing (CIFAR, Flowers-102)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision (default auto, as training resolves it: bf16 where the device computes "
                        "it natively, else fp32)")
    p.add_argument("--batch-size", type=_at_least(1, batch), default=500)
    p.add_argument("--workers", type=_at_least(0, threads), default=4, help="decoding workers for file datasets")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="test-time horizontal-flip averaging (default: as the run was evaluated, else off)")
    p.add_argument("--shift", action=argparse.BooleanOptionalAction,
                   help="test-time averaging with the image moved one pixel diagonally both ways (default: as the "
                        "run was evaluated, else off)")
    p.add_argument("--compile", action="store_true",
                   help="compile the model for inference first (seconds; pays off on large evaluation sets)")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--out", help="folder for eval.json and confusion.png")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = add("predict", cmd_predict, "classify images with a trained model",
            "  cct predict runs/keras-example cat.jpg dog.png\n  cct predict model.safetensors *.jpg --topk 3 --json\n"
            "  cct predict --model cct_2_3x2_32 --pretrained cifar10 cat.jpg   # weights shipped in the package")
    p.add_argument("images", nargs="+", help="CHECKPOINT (a weights file, run directory, Hub folder, "
                   "hf-hub:ORG/NAME or MODEL.TAG; omit it "
                   "with --pretrained) followed by image files of any size or mode")
    p.add_argument("--model", help="architecture name, for files that do not record it")
    p.add_argument("--pretrained", metavar="TAG",
                   help="use the weights TAG of --model (shipped, e.g. cifar10, or official)")
    p.add_argument("--topk", type=_at_least(1), default=5)
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = add("explain", cmd_explain, "draw where a trained model looked: sequence-pooling and attention maps",
            "  cct explain runs/keras-example cat.jpg dog.png -o maps/\n"
            "  cct explain --model cct_2_3x2_32 --pretrained cifar10 cat.png --topk 3 --json")
    p.add_argument("images", nargs="+", help="CHECKPOINT (a weights file, run directory or Hub folder; omit it "
                   "with --pretrained) followed by image files of any size or mode")
    p.add_argument("--model", help="architecture name, for files that do not record it")
    p.add_argument("--pretrained", metavar="TAG", help="use the shipped weights of --model, e.g. cifar10")
    p.add_argument("-o", "--out", default="explain", help="folder for one IMAGE-STEM.png per image "
                   "(default: explain/)")
    p.add_argument("--topk", type=_at_least(1), default=5)
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = add("demo", cmd_demo, "serve a web page to try a trained model on uploaded images (needs Gradio)",
            "  cct demo runs/keras-example\n  cct demo --model cct_2_3x2_32 --pretrained cifar10 --port 8080\n"
            "  cct demo hub/cct2-cifar10 --host 0.0.0.0   # reachable from other machines")
    p.add_argument("checkpoint", nargs="?", help="a weights file, run directory or Hub folder")
    p.add_argument("--model", help="architecture name, for files that do not record it")
    p.add_argument("--pretrained", metavar="TAG", help="use the shipped weights of --model, e.g. cifar10")
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_at_least(1), help="TCP port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also open a temporary public link (Gradio's servers)")

    p = add("export", cmd_export, "export a trained model to ONNX, safetensors, TorchScript or a Hub folder",
            "  cct export runs/keras-example --format onnx -o cct2.onnx\n"
            "  cct export runs/keras-example --format pt2 -o cct2.pt2      # torch.export program\n"
            "  cct export runs/keras-example --format torchscript -o cct2.pt\n"
            "  cct export runs/keras-example --format hub -o hub/cct2-cifar10\n"
            "  cct export --model cct_2_3x2_32 --pretrained cifar10 --format onnx -o cct2.onnx")
    p.add_argument("checkpoint", nargs="?", help="a .safetensors weights file, a run directory, a Hub folder, "
                   "hf-hub:ORG/NAME or MODEL.TAG")
    p.add_argument("--format", required=True, choices=("onnx", "pt2", "safetensors", "torchscript", "hub"))
    p.add_argument("-o", "--output", required=True, help="output file (a new folder for --format hub)")
    p.add_argument("--model", help="architecture name, for files that do not record it")
    p.add_argument("--pretrained", metavar="TAG",
                   help="export the weights TAG of --model (shipped, e.g. cifar10, or official)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add("push", cmd_push, "upload a trained model to the Hugging Face Hub (needs a network and a token)",
            "  cct push runs/keras-example me/cct2-cifar10\n  cct push hub/cct2-cifar10 me/cct2-cifar10")
    p.add_argument("checkpoint", help="a run directory, weights file or Hub folder")
    p.add_argument("repo_id", help="namespace/name on the Hub")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    p.add_argument("--model", help="architecture name, for files that do not record it")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as from Ctrl-C: atomic writes remove their
    temporary file, the run directory's lock is released, the last checkpoint stays."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM handled like Ctrl-C for the life of the command (where signals can be handled: the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_setup() -> None:
    """What a worker of a torchrun job does first: die with its launcher (no orphans if it is killed)."""
    from .train.distributed import die_with_launcher

    die_with_launcher()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cct` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = None
    try:
        with _sigterm_as_interrupt():
            if _under_torchrun():
                _worker_setup()
            args = build_parser().parse_args(argv)
            args.argv = argv  # for `cct train` to restart itself under torchrun
            args.func(args)
        return 0
    except KeyboardInterrupt as e:
        if not (_under_torchrun() and os.environ.get(_STARTED_BY_CCT)):  # not a worker `cct` started
            print(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}"
                  f"{getattr(args, 'interrupt_hint', lambda: '')()}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    except CCTError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:  # a path the system refuses (a name too long, a loop of links, ...) wherever it is met
        if debug:
            raise
        print(f"error: {_os_error_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # RuntimeError: torch's allocators report running out this way
        if debug or not _is_out_of_memory(e):
            raise
        print("error: out of memory: lower the settings that size the work (batch_size, eval_batch_size, "
              "img_size, workers, processes)", file=sys.stderr)
        return 1


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def _os_error_line(error: OSError) -> str:
    """An OSError as one line naming its file, with a short form of a long path."""
    name = str(error.filename) if error.filename is not None else ""
    if len(name) > 120:
        name = f"{name[:60]}...{name[-40:]}"
    return f"{name}: {error.strerror or error}" if name else str(error.strerror or error).splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
