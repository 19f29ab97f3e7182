"""Results as files and tables: CSV, Markdown, PNG plots, and a compact stdout table.

Every file starts with the header of :mod:`lstm_kernels.environment` (device,
driver, torch/triton/CUDA versions, commit): '# ' comment lines in the CSV,
the top lines of the Markdown, the suptitle of each PNG.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence, TextIO

from .configs import CELLS, DTYPES, cudnn_persistent_eligible
from lstm_kernels.environment import header_lines
from .providers import BASELINE, PROVIDERS
from .runner import OK, Result

COLUMNS = [
    "device", "dtype", "T", "B", "H", "I", "layers", "bidirectional", "impl", "pass",
    "median_ms", "p10_ms", "p90_ms", "peak_mem_mb", "speedup_vs_cudnn",
    "per_step_us", "reps", "cudnn_persistent_eligible", "status", "note", "paired_baseline_ms", "saved_mb",
    "reset_rate", "cell",
]  # fmt: skip
CONFIG_KEYS = ("device", "dtype", "T", "B", "H", "I", "layers", "bidirectional", "reset_rate", "cell", "pass")
IMPL_ORDER = list(PROVIDERS)
DTYPE_ORDER = list(DTYPES)

CSV_NAME = "results.csv"
MD_NAME = "summary.md"


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"


def rows_from_results(results: Iterable[Result], device_name: str) -> list[dict]:
    """CSV rows (dicts of strings), sorted, with speedup_vs_cudnn filled in."""
    rows = []
    for r in results:
        c, s = r.config, r.stats
        rows.append(
            {
                "device": device_name,
                "dtype": c.dtype,
                "T": c.T,
                "B": c.B,
                "H": c.H,
                "I": c.I,
                "layers": c.layers,
                "bidirectional": c.bidirectional,
                "reset_rate": c.reset_rate,
                "cell": c.cell,
                "impl": r.measurement.impl,
                "pass": r.measurement.pass_,
                "median_ms": s.median_ms if s else None,
                "p10_ms": s.p10_ms if s else None,
                "p90_ms": s.p90_ms if s else None,
                "peak_mem_mb": r.peak_mem_mb,
                "speedup_vs_cudnn": None,
                "per_step_us": s.median_ms * 1e3 / c.T if s else None,
                "reps": s.reps if s else 0,
                "cudnn_persistent_eligible": cudnn_persistent_eligible(c),
                "status": r.status,
                "note": r.note,
                "paired_baseline_ms": r.paired_baseline_ms,
                "saved_mb": r.saved_mb,
            }
        )
    add_speedups(rows)
    rows.sort(key=_sort_key)
    return rows


def _sort_key(row: dict):
    impl = row["impl"]
    return (
        DTYPE_ORDER.index(row["dtype"]) if row["dtype"] in DTYPE_ORDER else 99,
        CELLS.index(_cell_name(row)) if _cell_name(row) in CELLS else 99,
        _reset_rate(row),
        int(row["layers"]),
        str(row["bidirectional"]),
        int(row["H"]),
        int(row["B"]),
        int(row["T"]),
        row["pass"],
        IMPL_ORDER.index(impl) if impl in IMPL_ORDER else 99,
        impl,
    )


def _config_key(row: dict) -> tuple:
    """What makes two rows the same problem (a CSV written before the cell column was the LSTM's)."""
    return tuple(str(_cell_name(row) if k == "cell" else row[k]) for k in CONFIG_KEYS)


def _cell_name(row: dict) -> str:
    return row.get("cell") or "lstm"


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_cudnn = median of nn.LSTM / this median.

    nn.LSTM's median is the one timed interleaved with this row (``paired_baseline_ms``,
    on the CPU) where there is one, else that of the nn.LSTM row of the same config and pass.
    """
    baseline = {
        _config_key(row): float(row["median_ms"])
        for row in rows
        if row["impl"] == BASELINE and row["status"] == OK and row["median_ms"] not in (None, "")
    }
    for row in rows:
        base = baseline.get(_config_key(row))
        if row.get("paired_baseline_ms") not in (None, ""):
            base = float(row["paired_baseline_ms"])
        ok = row["status"] == OK and row["median_ms"] not in (None, "")
        row["speedup_vs_cudnn"] = base / float(row["median_ms"]) if (ok and base is not None) else None


# ---- CSV ----------------------------------------------------------------------------


def header_block(info: dict, meta: Optional[dict] = None) -> list[str]:
    lines = header_lines(info)
    lines += [f"{k}: {v}" for k, v in info.items()]
    lines += [f"{k}: {v}" for k, v in (meta or {}).items()]
    return lines


def write_csv(path: Path, rows: Sequence[dict], info: dict, meta: Optional[dict] = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        for line in header_block(info, meta):
            f.write(f"# {line}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row[k]) for k in COLUMNS})
    tmp.replace(path)
    return path


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """(header comment lines without '# ', rows as dicts of strings)."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    header = [line[2:] for line in lines if line.startswith("# ")]
    body = [line for line in lines if not line.startswith("#")]
    return header, list(csv.DictReader(body))


# ---- tables -------------------------------------------------------------------------


def _impls(rows: Sequence[dict]) -> list[str]:
    present = {r["impl"] for r in rows}
    return [i for i in IMPL_ORDER if i in present] + sorted(present - set(IMPL_ORDER))


def _groups(rows: Sequence[dict]):
    """{(dtype, pass): {config_key: {impl: row}}} in sorted order."""
    groups: dict = {}
    for r in rows:
        key = (r["dtype"], r["pass"])
        cfg = (int(r["layers"]), str(r["bidirectional"]) in ("True", "true", "1"), int(r["H"]), int(r["B"]), int(r["T"]),
               _reset_rate(r), _cell_name(r))
        groups.setdefault(key, {}).setdefault(cfg, {})[r["impl"]] = r
    return groups


def _cell(row: Optional[dict], with_speedup: bool = True) -> str:
    if row is None:
        return ""
    if row["status"] != OK or row["median_ms"] in (None, ""):
        return "skip"
    text = f"{float(row['median_ms']):.3g}"
    sp = row.get("speedup_vs_cudnn")
    if with_speedup and sp not in (None, "") and row["impl"] != BASELINE:
        paired = row.get("paired_baseline_ms")
        # A paired ratio is against the nn.LSTM median timed interleaved with this row, which can
        # differ from the nn.LSTM column's own run: show that median so the ratio can be checked.
        text += f" ({float(sp):.3g}x of {float(paired):.3g})" if paired not in (None, "") else f" ({float(sp):.3g}x)"
    return text


def speedup_legend(rows: Sequence[dict]) -> str:
    """What the ratio in parentheses is, for the table's title."""
    if any(r.get("paired_baseline_ms") not in (None, "") for r in rows):
        return ("(N x of M): speedup N = M / this median, where M is the median of nn.LSTM timed interleaved "
                "with this row (paired; the nn.LSTM column is a run of its own)")
    return "(N x): speedup = the nn.LSTM median of the same row / this median"


def _reset_rate(row: dict) -> float:
    """A row's reset_rate (0 in a CSV written before the column existed)."""
    return float(row.get("reset_rate") or 0)


def _case(cfg) -> str:
    layers, bidir, rate, cell = cfg[0], cfg[1], cfg[5], cfg[6]
    return ("GRU " if cell == "gru" else "") + f"{layers}{'bi' if bidir else ''}" + (f" r{rate:.0%}" if rate else "")


def format_table(rows: Sequence[dict]) -> str:
    """A compact text table: one line per (dtype, pass, config), median ms per impl (speedup vs nn.LSTM)."""
    impls = _impls(rows)
    head = ["dtype", "pass", "L", "H", "B", "T"] + impls
    lines = []
    for (dtype, pass_), configs in _groups(rows).items():
        for cfg, by_impl in configs.items():
            lines.append([dtype, pass_, _case(cfg), str(cfg[2]), str(cfg[3]), str(cfg[4])] + [_cell(by_impl.get(i)) for i in impls])
    widths = [max(len(h), *(len(line[k]) for line in lines)) if lines else len(h) for k, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def _number(value) -> Optional[float]:
    return None if value in (None, "") else float(value)


def _memory_cell(row: Optional[dict], baseline: Optional[dict]) -> str:
    """saved MiB (x of nn.LSTM's), then ' / peak MiB' where the GPU measured one."""
    if row is None:
        return ""
    saved, peak = _number(row.get("saved_mb")), _number(row.get("peak_mem_mb"))
    if saved is None and peak is None:
        return "skip" if row["status"] != OK else ""
    text = "" if saved is None else f"{saved:.3g}"
    base = None if baseline is None else _number(baseline.get("saved_mb"))
    if saved is not None and base and row["impl"] != BASELINE:
        text += f" ({saved / base:.2g}x)"
    if peak is not None:
        text += f" / {peak:.3g}"
    return text


def memory_lines(rows: Sequence[dict]) -> list[list[str]]:
    """fwd_bwd rows: per (dtype, config), each implementation's memory cell; [] when nothing was measured."""
    rows = [r for r in rows if r["pass"] == "fwd_bwd"]
    if not any(_number(r.get("saved_mb")) is not None or _number(r.get("peak_mem_mb")) is not None for r in rows):
        return []
    impls = _impls(rows)
    table = [["dtype", "L", "H", "B", "T"] + impls]
    for (dtype, _), configs in _groups(rows).items():
        for cfg, by_impl in configs.items():
            base = by_impl.get(BASELINE)
            table.append([dtype, _case(cfg), str(cfg[2]), str(cfg[3]), str(cfg[4])]
                         + [_memory_cell(by_impl.get(i), base) for i in impls])
    return table


MEMORY_LEGEND = ("memory of one fwd_bwd call in MiB: saved for backward beyond parameters and input "
                 "(saved_tensors_hooks; in parentheses: x nn.LSTM's)"
                 ", then / the GPU's peak above the allocations before the call (max_memory_allocated) where measured")


def format_memory_table(rows: Sequence[dict]) -> str:
    """:func:`memory_lines` as aligned text ("" when nothing was measured)."""
    table = memory_lines(rows)
    if not table:
        return ""
    widths = [max(len(line[k]) for line in table) for k in range(len(table[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def summary_lines(rows: Sequence[dict]) -> list[list[str]]:
    """Per (cell, dtype, pass, impl): measured/total, geometric-mean, min and max speedup vs torch's
    module of the cell (nn.LSTM, nn.GRU)."""
    table = [["cell", "dtype", "pass", "impl", "ok/total", "geomean x", "min x", "max x"]]
    keys: dict = {}
    for r in rows:
        keys.setdefault((_cell_name(r), r["dtype"], r["pass"], r["impl"]), []).append(r)
    def rank(order, value):
        return order.index(value) if value in order else 99

    order = sorted(keys, key=lambda k: (rank(CELLS, k[0]), rank(DTYPE_ORDER, k[1]), k[2], rank(IMPL_ORDER, k[3])))
    for key in order:
        group = keys[key]
        ok = [r for r in group if r["status"] == OK]
        sp = [float(r["speedup_vs_cudnn"]) for r in ok if r["speedup_vs_cudnn"] not in (None, "")]
        geo = math.exp(sum(math.log(v) for v in sp) / len(sp)) if sp else None
        table.append([*key, f"{len(ok)}/{len(group)}", _fmt(geo, 3), _fmt(min(sp) if sp else None, 3),
                      _fmt(max(sp) if sp else None, 3)])  # fmt: skip
    return table


def format_summary(rows: Sequence[dict]) -> str:
    table = summary_lines(rows)
    widths = [max(len(line[k]) for line in table) for k in range(len(table[0]))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def print_table(rows: Sequence[dict], file: Optional[TextIO] = None, max_lines: Optional[int] = None) -> None:
    """Print :func:`format_table` (median ms; speedup vs nn.LSTM in parentheses) to ``file`` or stdout."""
    file = file if file is not None else sys.stdout
    n_lines = len({(r["dtype"], r["pass"], r["layers"], r["bidirectional"], r["H"], r["B"], r["T"], _reset_rate(r),
                    _cell_name(r))
                   for r in rows})
    if max_lines is not None and n_lines > max_lines:
        print(f"speedup vs nn.LSTM by dtype, pass and impl ({n_lines} table lines: see the Markdown file)", file=file)
        print(format_summary(rows), file=file)
        return
    print(f"median ms per call; {speedup_legend(rows)}; > 1 is faster; L = layers, 'bi' = bidirectional", file=file)
    print(format_table(rows), file=file)


# ---- Markdown -----------------------------------------------------------------------


def write_markdown(path: Path, rows: Sequence[dict], info: dict, meta: Optional[dict] = None) -> Path:
    impls = _impls(rows)
    out = [f"# LSTM benchmarks: {info['device']}", ""]
    out += [f"- {line}" for line in header_lines(info)]
    out += [f"- {k}: {v}" for k, v in (meta or {}).items()]
    out += [
        "",
        f"Median time per call in ms; {speedup_legend(rows)}; > 1 is faster. ",
        "`fwd` = forward under no_grad; `fwd_bwd` = forward + backward (input and weight gradients). "
        "`skip` = see the notes below.",
        "",
    ]
    summary = summary_lines(rows)
    out += ["## Summary: speedup vs nn.LSTM", ""]
    out += ["| " + " | ".join(summary[0]) + " |", "|" + "---|" * len(summary[0])]
    out += ["| " + " | ".join(line) + " |" for line in summary[1:]]
    out.append("")
    groups = _groups(rows)
    for (dtype, pass_), configs in groups.items():
        out += [f"## {dtype}, {pass_}", ""]
        out += ["| L | H | B | T | " + " | ".join(impls) + " |", "|" + "---|" * (4 + len(impls))]
        for cfg, by_impl in configs.items():
            cells = [_cell(by_impl.get(i)) for i in impls]
            out.append(f"| {_case(cfg)} | {cfg[2]} | {cfg[3]} | {cfg[4]} | " + " | ".join(cells) + " |")
        out.append("")

    memory = memory_lines(rows)
    if memory:
        out += ["## Memory (fwd_bwd)", "", MEMORY_LEGEND[0].upper() + MEMORY_LEGEND[1:] + ".", ""]
        out += ["| " + " | ".join(memory[0]) + " |", "|" + "---|" * len(memory[0])]
        out += ["| " + " | ".join(line) + " |" for line in memory[1:]]
        out.append("")

    out += ["## Per-step latency (B <= 16)", "", "median_ms / T, in microseconds per time step.", ""]
    for (dtype, pass_), configs in groups.items():
        small = {cfg: v for cfg, v in configs.items() if cfg[3] <= 16}
        if not small:
            continue
        out += [f"### {dtype}, {pass_}", ""]
        out += ["| L | H | B | T | " + " | ".join(impls) + " |", "|" + "---|" * (4 + len(impls))]
        for cfg, by_impl in small.items():
            cells = []
            for i in impls:
                r = by_impl.get(i)
                ok = r is not None and r["status"] == OK and r["per_step_us"] not in (None, "")
                cells.append(f"{float(r['per_step_us']):.3g}" if ok else ("skip" if r is not None else ""))
            out.append(f"| {_case(cfg)} | {cfg[2]} | {cfg[3]} | {cfg[4]} | " + " | ".join(cells) + " |")
        out.append("")

    notes: dict[str, int] = {}
    for r in rows:
        if r["note"]:
            key = f"{r['impl']} ({r['status']}): {r['note']}"
            notes[key] = notes.get(key, 0) + 1
    if notes:
        out += ["## Notes and skips", ""]
        out += [f"- {k} — {n} row(s)" for k, n in sorted(notes.items())]
        out.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))
    return path


# ---- PNG ----------------------------------------------------------------------------


def write_plots(out_dir: Path, rows: Sequence[dict], info: dict) -> list[Path]:
    """time_vs_T_<dtype>.png (one panel per pass x B, one line per impl, at one H)
    and speedup_<dtype>.png (heatmaps B x T of each non-baseline impl vs nn.LSTM, per pass x H)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    suptitle = "\n".join(header_lines(info))
    written = []
    single = [r for r in rows if int(r["layers"]) == 1 and str(r["bidirectional"]) in ("False", "false", "0")
              and not _reset_rate(r) and _cell_name(r) == "lstm"]  # the plots show the LSTM
    ok = [r for r in single if r["status"] == OK and r["median_ms"] not in (None, "")]
    impls = _impls(single)
    for dtype in [d for d in DTYPE_ORDER if any(r["dtype"] == d for r in ok)]:
        sub = [r for r in ok if r["dtype"] == dtype]
        Hs = sorted({int(r["H"]) for r in sub})
        H = 512 if 512 in Hs else Hs[len(Hs) // 2]
        passes = [p for p in ("fwd", "fwd_bwd") if any(r["pass"] == p for r in sub)]
        Bs = sorted({int(r["B"]) for r in sub if int(r["H"]) == H})
        fig, axes = plt.subplots(len(passes), len(Bs), figsize=(3.2 * len(Bs) + 1 + LEGEND_WIDTH_IN,
                                                                3.0 * len(passes) + 1.2), squeeze=False)
        for pi, pass_ in enumerate(passes):
            for bi, B in enumerate(Bs):
                ax = axes[pi][bi]
                for impl in impls:
                    pts = sorted(
                        (int(r["T"]), float(r["median_ms"]))
                        for r in sub
                        if r["impl"] == impl and r["pass"] == pass_ and int(r["B"]) == B and int(r["H"]) == H
                    )
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=_color(impl), label=impl)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                Ts = sorted({int(r["T"]) for r in sub})
                ax.set_xticks(Ts, [str(t) for t in Ts])
                ax.minorticks_off()
                # 1-2-5 ticks labelled in plain numbers: a narrow range still gets several labels
                ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.set_title(f"{pass_}, B={B}, H={H}", fontsize=9)
                ax.set_xlabel("T")
                ax.set_ylabel("median ms")
                ax.grid(True, which="both", alpha=0.3)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=_color(i), marker="o", label=i) for i in impls
                   if any(r["impl"] == i and int(r["H"]) == H for r in sub)]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0 - LEGEND_WIDTH_IN / fig.get_figwidth(), 0.5),
                   fontsize=7, frameon=False)
        fig.suptitle(f"time vs T ({dtype}, 1 layer)\n{suptitle}", fontsize=8)
        _layout(fig, right_in=LEGEND_WIDTH_IN)
        written.append(_save(fig, out_dir / f"time_vs_T_{dtype}.png", plt))

        contenders = [i for i in impls if i != BASELINE]
        Hs_all = sorted({int(r["H"]) for r in sub})
        panels = [(impl, p) for impl in contenders for p in passes]
        if not panels:
            continue
        fig, axes = plt.subplots(
            len(panels), len(Hs_all), figsize=(3.6 * len(Hs_all) + 1 + COLORBAR_WIDTH_IN, 2.8 * len(panels) + 1.2),
            squeeze=False,
        )
        for ri, (impl, pass_) in enumerate(panels):
            for hi, H in enumerate(Hs_all):
                ax = axes[ri][hi]
                cells = [r for r in sub if r["impl"] == impl and r["pass"] == pass_ and int(r["H"]) == H]
                Ts = sorted({int(r["T"]) for r in sub if int(r["H"]) == H})
                Bs_h = sorted({int(r["B"]) for r in sub if int(r["H"]) == H})
                grid = [[math.nan] * len(Ts) for _ in Bs_h]
                for r in cells:
                    if r["speedup_vs_cudnn"] not in (None, ""):
                        grid[Bs_h.index(int(r["B"]))][Ts.index(int(r["T"]))] = float(r["speedup_vs_cudnn"])
                image = _heatmap(ax, grid, Ts, Bs_h)
                ax.set_title(f"{impl} {pass_}, H={H}", fontsize=8)
        fig.suptitle(f"speedup vs nn.LSTM ({dtype}, 1 layer; > 1 is faster)\n{suptitle}", fontsize=8)
        _layout(fig, right_in=COLORBAR_WIDTH_IN)
        colorbar_axes = fig.add_axes((1.0 - 0.8 * COLORBAR_WIDTH_IN / fig.get_figwidth(), 0.15,
                                      0.2 / fig.get_figwidth(), 0.6))
        colorbar = fig.colorbar(image, cax=colorbar_axes, ticks=[0.1, 0.25, 0.5, 1, 2, 4, 10])
        colorbar.ax.set_yticklabels(["≤0.1", "0.25", "0.5", "1", "2", "4", "≥10"], fontsize=7)
        colorbar.set_label("speedup vs nn.LSTM", fontsize=7)
        written.append(_save(fig, out_dir / f"speedup_{dtype}.png", plt))
    return written


def _heatmap(ax, grid, Ts, Bs):
    """One B x T grid of speedups on a log colour scale centred on 1; returns the image (for a colour bar)."""
    import matplotlib.colors as mcolors

    norm = mcolors.LogNorm(vmin=0.1, vmax=10.0)
    clipped = [[min(max(v, 0.1), 10.0) if not math.isnan(v) else math.nan for v in row] for row in grid]
    image = ax.imshow(clipped, cmap="RdYlGn", norm=norm, aspect="auto", origin="lower")
    ax.set_xticks(range(len(Ts)), [str(t) for t in Ts], fontsize=7)
    ax.set_yticks(range(len(Bs)), [str(b) for b in Bs], fontsize=7)
    ax.set_xlabel("T", fontsize=7)
    ax.set_ylabel("B", fontsize=7)
    cells = len(Ts) * len(Bs)
    size = 9 if cells <= 12 else 7 if cells <= 30 else 6
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            # dark text on the pale middle of the scale, white on its saturated ends
            pale = math.isnan(v) or 0.4 <= v <= 2.5
            ax.text(x, y, "—" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=size,
                    color="black" if pale else "white", fontweight="bold")
    return image


def _color(impl: str) -> str:
    """One color per implementation, the same in every panel and file."""
    return f"C{IMPL_ORDER.index(impl) % 10}" if impl in IMPL_ORDER else "k"


#: Inches kept free right of the panels for the legend (time vs T) and the colour bar (speedups).
LEGEND_WIDTH_IN = 1.6
COLORBAR_WIDTH_IN = 1.0


def _layout(fig, right_in: float = 0.0) -> None:
    """tight_layout below the (three-line) suptitle, leaving ``right_in`` inches free on the right."""
    top = 1.0 - 0.75 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1.0 - right_in / fig.get_figwidth(), top))


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
