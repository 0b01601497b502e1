"""`cct bench` per kind of CPU: this CPU as it is, and the same CPU with PyTorch capped at AVX2, which is what a
CPU without native bf16 (most Intel laptops, AMD before Zen 4) looks like to PyTorch.

Rows, for each model (`cct_2_3x2_32`, `cct_2_3x2_32_h32`, `cct_7_3x1_32` by default):

* this CPU, `--precision auto` (what every recipe asks for) and `--precision fp32`;
* this CPU with PyTorch's own path only (`CCT_CPU_KIND=avx512`: no C kernels, SDPA attention), `--precision bf16`:
  what the fast paths are measured against;
* emulated AVX2 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`), `--precision
  auto` (resolves to fp32) and `fp32`, and for the first model also `bf16`: the row that shows why `auto` does not
  pick bf16 there.

Each row is one `python -m cct bench --json` in a fresh process with its environment, in the default layout of
its recipe (`cifar10-fast`: 2 DDP processes of one thread), one after another. Emulated bf16 is slow: its
matmul peak alone takes minutes, and a `cct_7_3x1_32` row in it (one window) about half an hour, hence one model.
The JSON of each row (with the environment and the 1-minute load average before and after it) goes to `--out` (default
`benchmarks/results/bench/cpu-kinds/`) as `<model>-<kind>-<precision asked>.json`, the Markdown table beside it as
`table.md`; `--update-docs` also puts the table into docs/cpu-kinds.md between its markers. Timings are only
worth recording on a quiet machine (load average < 0.5).

    python benchmarks/cpu_kinds.py [--models cct_2_3x2_32 ...] [--windows 5] [--batch-size 128] [--update-docs]
    python benchmarks/cpu_kinds.py --table-only --update-docs    # the table of every row recorded so far
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cct_2_3x2_32", "cct_2_3x2_32_h32", "cct_7_3x1_32")
EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# (label, environment added, precisions asked for)
# `CCT_CPU_KIND=avx512` turns the C kernels and the explicit attention off: with bf16 asked for, the row is
# PyTorch's own path at the precision `auto` runs, the baseline the kernels must never lose to.
SETTINGS = (("this CPU", {}, ("auto", "fp32")), ("this CPU, PyTorch only", {"CCT_CPU_KIND": "avx512"}, ("bf16",)),
            ("emulated AVX2", EMULATED_AVX2, ("auto", "bf16", "fp32")))
# the slowest model times fewer windows, as README's rows of it do, and one window in emulated bf16, where each of
# its steps takes minutes
WINDOWS = {("cct_7_3x1_32", "fp32"): 3, ("cct_7_3x1_32", "auto"): 3, ("cct_7_3x1_32", "bf16"): 1}
DOCS = ROOT / "docs" / "cpu-kinds.md"
MARKERS = ("<!-- cpu-kinds table: written by benchmarks/cpu_kinds.py -->", "<!-- end of cpu-kinds table -->")


def bench_row(model: str, precision: str, env: dict[str, str], windows: int, batch_size: int) -> dict[str, Any]:
    """One `cct bench --json` run in a fresh process with `env` added; its JSON with the run's conditions."""
    command = [sys.executable, "-m", "cct", "bench", "--model", model, "--precision", precision, "--json",
               "--windows", str(windows), "--batch-size", str(batch_size)]
    load_before = os.getloadavg()
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    result = json.loads(done.stdout)
    result.update(precision_asked=precision, environment=env, command=" ".join(command[1:]),
                  loadavg_before=round(load_before[0], 2), loadavg_after=round(os.getloadavg()[0], 2),
                  load_warning=load_before[0] > 0.5)
    return result


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the rows."""
    lines = ["| model | PyTorch sees | kind | precision asked -> ran | CPU kernels | train img/s | inference img/s "
             "| matmul peak GFLOP/s (same precision) | fraction of peak |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['setting']} | {r['cpu_kind']} | {r['precision_asked']} -> "
                     f"{r['precision']} | {'yes' if r['cpu_kernels'] else 'no'} | {r['train_img_per_s']:,.1f} | "
                     f"{r['infer_img_per_s']:,.1f} | {r['peak_matmul_gflops']:,.1f} | {r['fraction_of_peak']:.3f} |")
    first = rows[0]
    lines.append(f"\n{first['device']}, torch {first['torch']}, batch {first['batch_size']} in "
                 f"{first['processes']} process(es) of {first['threads']} thread(s); 1-minute load average "
                 f"{min(r['loadavg_before'] for r in rows)}-{max(r['loadavg_after'] for r in rows)}"
                 + (" (NOT a quiet machine)" if any(r["load_warning"] for r in rows) else "") + ".")
    return "\n".join(lines) + "\n"


def recorded_rows(out: Path, models: list[str]) -> list[dict[str, Any]]:
    """The rows already recorded in `out` as JSON, in the table's order (model, setting, precision)."""
    rows = []
    for model in models:
        for setting, env, precisions in SETTINGS:
            for precision in precisions:
                for path in sorted(out.glob(f"{model}-*-{precision}.json")):
                    row = json.loads(path.read_text())
                    if row["environment"] == env and row["precision_asked"] == precision:
                        rows.append(dict(row, setting=setting))
    return rows


def update_docs(markdown: str) -> None:
    """Replace the table between the markers of docs/cpu-kinds.md."""
    text = DOCS.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    DOCS.write_text(f"{text[:start]}\n{markdown}{text[end:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--windows", type=int, default=5,
                        help="timed windows per row (cct_7_3x1_32: at most 3, in emulated bf16 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench" / "cpu-kinds")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/cpu-kinds.md")
    parser.add_argument("--no-emulated-bf16", action="store_true", help="skip the emulated bf16 row altogether")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: build the table from the JSON rows already in --out (of every run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = recorded_rows(args.out, args.models) if args.table_only else []
    for model in [] if args.table_only else args.models:
        for setting, env, precisions in SETTINGS:
            emulated = env is EMULATED_AVX2
            for precision in precisions:
                if emulated and precision == "bf16" and (args.no_emulated_bf16 or model != args.models[0]):
                    continue  # emulated bf16 is shown once: it costs minutes per row and decides nothing new
                windows = min(args.windows, WINDOWS.get((model, precision if emulated else "auto"), args.windows))
                row = bench_row(model, precision, env, windows, args.batch_size)
                row["setting"] = setting
                rows.append(row)
                name = f"{model}-{row['cpu_kind']}-{precision}.json"
                (args.out / name).write_text(json.dumps(row, indent=2) + "\n")
                print(f"{model:<18} {setting:<14} {precision:>4} -> {row['precision']:<5} train "
                      f"{row['train_img_per_s']:>9,.1f} img/s  inference {row['infer_img_per_s']:>9,.1f} img/s",
                      flush=True)
    markdown = table(rows)
    (args.out / "table.md").write_text(markdown)
    print("\n" + markdown)
    if args.update_docs:
        update_docs(markdown)


if __name__ == "__main__":
    main()
