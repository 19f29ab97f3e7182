"""Command line: ``python -m benchmarks [filters]`` (``make bench`` runs it with none).

With no arguments it does the right thing for the device present: on a GPU
the full sweep within a time budget, results in benchmarks/results/<gpu>/;
on the CPU a small sweep (under two minutes), results in benchmarks/out/.
``python -m benchmarks --help`` lists the filters.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from lstm_kernels import environment as env_info

from . import configs as cfgs
from . import report, timing
from .providers import BASELINE, PROVIDERS, default_impls
from .runner import plan, run_sweep

PACKAGE_DIR = Path(__file__).resolve().parent
#: Default wall-clock budget of the sweep loop, in seconds (the GPU run has ~8 minutes in all).
DEFAULT_BUDGET_S = {"cuda": 360.0, "cpu": 90.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time FusedLSTM's backends against nn.LSTM (cuDNN) and peers over T x B x H x dtype.",
    )
    p.add_argument("--T", help="sequence lengths, comma-separated (default: the device's grid)")
    p.add_argument("--B", help="batch sizes, comma-separated")
    p.add_argument("--H", help="hidden sizes (input size = H), comma-separated")
    p.add_argument("--dtype", help=f"dtypes among {','.join(cfgs.DTYPES)} (default: all on GPU, fp32 on CPU)")
    p.add_argument("--impl", help=f"implementations among {','.join(PROVIDERS)} (default: all available)")
    p.add_argument("--pass", dest="passes", help="passes among fwd,fwd_bwd (default: both)")
    p.add_argument("--case", help="cases among single (1 layer), bidir (2 layers, bidirectional) and resets (1 layer, "
                   "episodes ending inside the sequence); default all three")
    p.add_argument("--cell", help=f"recurrent cells among {','.join(cfgs.CELLS)}, each against torch's module "
                   "(nn.LSTM, nn.GRU; the baseline column keeps the name nn.LSTM); default lstm")
    p.add_argument("--layers", type=int, help="one custom case with this many layers (replaces --case)")
    p.add_argument("--bidirectional", action="store_true", default=None, help="the custom case is bidirectional")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<gpu> or benchmarks/out)")
    p.add_argument("--reps", type=int, default=20, help="minimum timed repetitions per measurement (default 20)")
    p.add_argument("--max-reps", type=int, default=100, help="repetitions for cheap calls, up to this (default 100)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 3 on GPU, 2 on CPU; at least 1)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of the sweep in seconds; 0 = none "
                   f"(default {DEFAULT_BUDGET_S['cuda']:.0f} on GPU, {DEFAULT_BUDGET_S['cpu']:.0f} on CPU)")
    p.add_argument("--quick", action="store_true", help="a small corner of the grid")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default 1 on the CPU, steadier on a shared "
                   "machine; 0 = torch's default)")
    p.add_argument("--tf32", choices=("on", "off"), default="off", help="TF32 for fp32 matmuls and cuDNN (default off)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate, run nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"

    try:
        explicit_impls = args.impl is not None
        impls = list(cfgs.parse_names(args.impl, PROVIDERS) or default_impls(device))
        if BASELINE not in impls:
            print(f"note: {BASELINE} not in --impl; speedup_vs_cudnn will be empty", file=sys.stderr)
        passes = list(cfgs.parse_names(args.passes, cfgs.PASSES) or cfgs.PASSES)
        configs = cfgs.build_configs(
            device,
            T=cfgs.parse_ints(args.T),
            B=cfgs.parse_ints(args.B),
            H=cfgs.parse_ints(args.H),
            dtype=cfgs.parse_names(args.dtype, cfgs.DTYPES),
            cases=cfgs.parse_names(args.case, cfgs.CASES),
            layers=args.layers,
            bidirectional=args.bidirectional,
            quick=args.quick,
            cells=cfgs.parse_names(args.cell, cfgs.CELLS),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 2)
    budget_s = DEFAULT_BUDGET_S[device] if args.budget_s is None else (args.budget_s or None)
    info = env_info.collect(device)
    out_dir = args.out or (
        PACKAGE_DIR / "results" / env_info.slug(info["device"]) if device == "cuda" else PACKAGE_DIR / "out"
    )

    todo, skipped = plan(configs, impls, passes, device, explicit_impls)
    estimate = sum(cfgs.estimate_seconds(m, device) * (warmup + args.reps + 1) for m in todo)
    meta = {
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "impls": ",".join(impls),
        "budget_s": budget_s if budget_s is not None else "none",
        "warmup": warmup,
        "min_reps": args.reps,
    }
    if device == "cpu":
        meta["cpu_allocator"] = timing.keep_cpu_allocations() or "default"
    print("\n".join(env_info.header_lines(info)))
    print(
        f"{len(configs)} configs, {len(todo)} measurements to run, {len(skipped)} skipped up front; "
        f"rough estimate {estimate:.0f} s of timed calls; budget {meta['budget_s']} s; output {out_dir}"
    )
    for r in {(r.measurement.impl, r.note) for r in skipped}:
        print(f"  skip {r[0]}: {r[1]}")
    if args.dry_run:
        return 0

    csv_path = out_dir / report.CSV_NAME

    def checkpoint(results):  # a valid CSV after every config, so a killed run keeps its data
        report.write_csv(csv_path, report.rows_from_results(skipped + results, info["device"]), info, meta)

    results = run_sweep(
        todo,
        device,
        warmup=warmup,
        min_reps=args.reps,
        max_reps=args.max_reps,
        budget_s=budget_s,
        progress=not args.no_progress,
        on_config_done=checkpoint,
    )
    rows = report.rows_from_results(skipped + results, info["device"])
    meta["sweep_s"] = f"{time.perf_counter() - t_start:.1f}"
    written = [report.write_csv(csv_path, rows, info, meta), report.write_markdown(out_dir / report.MD_NAME, rows, info, meta)]
    if not args.no_plots:
        try:
            written += report.write_plots(out_dir, rows, info)
        except Exception as exc:  # noqa: BLE001  (plots are a convenience; the CSV is the record)
            print(f"warning: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    report.print_table(rows, max_lines=60)
    memory = report.format_memory_table(rows)
    if memory and memory.count("\n") < 60:
        print(report.MEMORY_LEGEND)
        print(memory)
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"{n_ok}/{len(rows)} measurements ok in {time.perf_counter() - t_start:.1f} s; wrote:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
