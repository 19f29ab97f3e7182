"""``python -m lstm_kernels check`` (also ``lstm-kernels check``): what this machine can run, proven.

The first command to run on a machine, before the test suite. It reports:

1. the device, driver and versions, and which backends are available (and why the others are not);
2. every available backend x variant x dtype (on a GPU float32 both at fp32 accuracy, ``fp32``, and on
   TF32, ``tf32``: torch.backends.cuda.matmul.allow_tf32 set) verified on a fixed set of small shapes (and, on a
   GPU, the flagship B = 16, H = 768, with and without a projection; and the GRU's calls): the
   plan's prefix forward and backward against float64, as verification before first use runs it
   (:func:`lstm_kernels.verification.verify`), grid barriers bounded, so a hang becomes a failure;
   and FusedLSTM's path through torch's own kernel against nn.LSTM (bitwise on the CPU; on a GPU
   within tolerance, with backward in eval mode);
3. µs per step, forward and forward + backward, of FusedLSTM on each backend and variant that
   passed and on torch's own kernel, against nn.LSTM timed in the same run, with the ratio (GPU:
   the flagship shape, T = 1024, CUDA events; CPU: a small shape, wall clock); on a GPU also what
   ``auto`` chose there by measuring (lstm_kernels.autotune), and why.

It writes ``check.md`` and ``check.csv`` to ``--out`` (headed by device, versions and commit) and
exits non-zero if any verification failed or any run raised. On a CPU it runs what a CPU can: the
reference, the native path, and the Triton kernels under the interpreter at tiny shapes (it sets
``TRITON_INTERPRET=1`` for itself when no GPU is present). It is designed to finish within five
minutes on an H100 and within a minute on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .autotune import median_ms

#: The precisions checked: "fp32" is float32 at fp32 accuracy (torch.backends.cuda.matmul.allow_tf32 off, torch's
#: default), "tf32" float32 with it on (a GPU only: the kernels' products on TF32; nn.LSTM's cuDNN takes TF32 by
#: torch.backends.cudnn.allow_tf32, on by default, in both).
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: (B, H, P or None, variable lengths, cell): tails in B and H, a projection, PackedSequence-like rows,
#: the GRU.
CPU_SHAPES = [(2, 5, None, False, "lstm"), (3, 8, 3, False, "lstm"), (3, 6, None, True, "lstm"),
              (3, 5, None, False, "gru"), (3, 6, None, True, "gru")]
GPU_SHAPES = [(1, 13, None, False, "lstm"), (17, 100, None, False, "lstm"), (16, 256, None, True, "lstm"),
              (16, 768, None, False, "lstm"), (16, 768, 256, False, "lstm"), (17, 100, None, False, "gru"),
              (16, 768, None, False, "gru")]
FLAGSHIP = dict(T=1024, B=16, H=768)
CPU_TIMING = dict(T=64, B=8, H=64)


@dataclass
class Row:
    kind: str  # "verify" or "time"
    backend: str
    variant: str
    dtype: str
    shape: str
    ok: bool
    detail: str = ""
    max_error: Optional[float] = None
    fwd_us: Optional[float] = None  # per step
    fwd_bwd_us: Optional[float] = None
    nn_fwd_us: Optional[float] = None
    nn_fwd_bwd_us: Optional[float] = None


@dataclass
class Candidate:
    """One backend x variant: the backend object verification runs, the environment that selects
    the variant, and the name FusedLSTM takes."""
    backend: str
    variant: str
    make: Callable[[], object]
    env: dict


def candidates(names: Sequence[str]) -> list[Candidate]:
    from .backends import get_backend

    found = []
    for name in names:
        if name == "cuda":  # every variant of the fused kernels (all measured), then the per-step kernels
            from .backends.cuda.variants import FUSED_CANDIDATES, VARIANT_ENV

            found += [Candidate("cuda", label, lambda: get_backend("cuda"), env)
                      for label, env in (*FUSED_CANDIDATES.items(), ("step", {VARIANT_ENV: "step"}))]
        elif name == "triton":
            from .backends.triton import TritonBackend

            found += [Candidate("triton", v, (lambda v=v: TritonBackend(v)), {"LSTM_KERNELS_TRITON_VARIANT": v})
                      for v in ("step", "persistent")]
        else:
            found.append(Candidate(name, "-", (lambda name=name: get_backend(name)), {}))
    return found


@contextlib.contextmanager
def matmul_precision(dtype_name: str):
    """torch.backends.cuda.matmul.allow_tf32 as ``dtype_name`` asks (on for "tf32", off for "fp32", as it was
    for the 16-bit types), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32
    if dtype_name in ("fp32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def environment_set(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _call(device, dtype, T, B, H, P, varlen, cell="lstm"):
    from .backends import RecurrenceCall

    return RecurrenceCall(seq_len=T, batch=B, hidden_size=H, state_size=P or H, dtype=dtype, device=device,
                          has_projection=P is not None, variable_lengths=varlen, needs_grad=True, cell=cell)


def verify_all(cands: list[Candidate], device: torch.device, shapes, dtypes, steps: int) -> list[Row]:
    from . import verification

    rows = []
    for cand in cands:
        for dtype_name in dtypes:
            for B, H, P, varlen, cell in shapes:
                shape = (("GRU " if cell == "gru" else "") + f"B={B} H={H}" + (f" P={P}" if P else "")
                         + (" packed" if varlen else ""))
                call = _call(device, DTYPES[dtype_name], steps, B, H, P, varlen, cell)
                with environment_set(cand.env), matmul_precision(dtype_name):
                    backend = cand.make()
                    why = backend.unavailable_reason() or backend.supports(call)
                    if why is None and cell not in backend.cells:
                        why = f"the {backend.name!r} backend does not serve the {cell.upper()} cell"
                    if why is not None:
                        rows.append(Row("verify", cand.backend, cand.variant, dtype_name, shape, True, f"not served: {why}"))
                        continue
                    verdict = verification.verify(backend, call, steps=steps)
                rows.append(Row("verify", cand.backend, cand.variant, dtype_name, shape, verdict.ok, verdict.detail,
                                verdict.max_error))
    return rows


@contextlib.contextmanager
def native_outright():
    """Within the block ``auto`` takes torch's own kernel wherever it may serve, unmeasured (on a GPU
    it is otherwise one candidate of the measured choice): how the check times that path itself."""
    from .backends import native

    original = native.taken_outright
    native.taken_outright = lambda x: True
    try:
        yield
    finally:
        native.taken_outright = original


def check_native_path(device: torch.device) -> Row:
    """FusedLSTM's path through torch's own kernel against nn.LSTM, outputs and every gradient in
    training mode: bitwise on the CPU (the same kernel); on a GPU within the TF32 tolerance (cuDNN
    may pick other algorithms per call), and backward in eval mode, which cuDNN alone refuses."""
    from . import FusedLSTM
    from .tolerances import REL_TOL, mismatch

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True).to(device)
    fused = FusedLSTM.from_torch(lstm)
    x = torch.randn(4, 3, 5, device=device)
    results = []
    with native_outright():
        for module in (fused, lstm):
            xx = x.clone().requires_grad_(True)
            out, (h, c) = module(xx)
            (out.square().sum() + h.sum() + c.sum()).backward()
            results.append([out, h, c, xx.grad, *(p.grad for p in module.parameters())])
        path = fused.path_for(x)
        eval_backward = "not checked"
        if device.type == "cuda":
            xx = x.clone().requires_grad_(True)
            fused.eval()(xx)[0].sum().backward()
            eval_backward = "works" if torch.isfinite(xx.grad).all() else "gave non-finite gradients"
    if device.type == "cpu":
        same = all(torch.equal(a, b) for a, b in zip(*results))
        detail = "bitwise nn.LSTM" if same else "differs from nn.LSTM"
    else:
        errors = [mismatch(a, b, REL_TOL["tf32"]) for a, b in zip(*results)]
        same = all(e is None for e in errors) and eval_backward == "works"
        detail = (f"nn.LSTM's results within {REL_TOL['tf32']:g}; eval-mode backward {eval_backward}" if same else
                  "; ".join(e for e in errors if e) or f"eval-mode backward {eval_backward}")
    return Row("verify", "native", "-", "fp32", "B=3 H=6 L2bi", same and path == "native", f"path {path}; {detail}")


def _timing_problem(device: torch.device, dtype_name: str, shape: dict):
    """(nn.LSTM, x [T, B, H], label) of a timing row: the same weights and input for every path."""
    T, B, H = shape["T"], shape["B"], shape["H"]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(H, H).to(device, dtype)
    return lstm, torch.randn(T, B, H, device=device, dtype=dtype), f"T={T} B={B} H={H}"


def _failed_time_row(backend: str, variant: str, dtype_name: str, label: str, error: Exception) -> Row:
    return Row("time", backend, variant, dtype_name, label, False,
               f"raised {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")


def _time_row(backend: str, variant: str, dtype_name: str, label: str, steps: int, times, nn_times,
              note: str = "") -> Row:
    """A timing row: (forward, forward + backward) median ms of the path and of nn.LSTM, per step."""
    (fwd, fb), (nn_fwd, nn_fb) = times, nn_times
    per_step = 1e3 / steps
    return Row("time", backend, variant, dtype_name, label, True,
               f"{nn_fwd / fwd:.2f}x forward, {nn_fb / fb:.2f}x forward+backward of nn.LSTM" + note,
               fwd_us=fwd * per_step, fwd_bwd_us=fb * per_step, nn_fwd_us=nn_fwd * per_step,
               nn_fwd_bwd_us=nn_fb * per_step)


def time_auto(device: torch.device, dtypes, shape: dict) -> list[Row]:
    """What ``auto`` chooses at ``shape`` (measured on this machine) and how fast that is."""
    from . import FusedLSTM

    rows = []
    for dtype_name in dtypes:
        lstm, x, label = _timing_problem(device, dtype_name, shape)
        fused = FusedLSTM.from_torch(lstm)
        try:
            with matmul_precision(dtype_name):
                with torch.no_grad():
                    inference = fused.path_for(x, explain=True)
                training = fused.path_for(x.requires_grad_(True), explain=True)
                x.requires_grad_(False)
                nn_times, times = _step_times(lstm, x), _step_times(fused, x)
        except Exception as error:  # noqa: BLE001 - reported as a failed row
            rows.append(_failed_time_row("auto", "-", dtype_name, label, error))
            continue
        rows.append(_time_row("auto", f"{inference.path}/{training.path}", dtype_name, label, shape["T"], times,
                              nn_times, f"; inference: {inference.reason}; training: {training.reason}"))
    return rows


def _median_ms(fn, device: torch.device) -> float:
    return median_ms(fn, device, warmup=2, reps=7)


def _step_times(module, x) -> tuple[float, float]:
    """(forward, forward + backward) median ms of ``module`` on ``x``."""
    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        out, (h, c) = module(x)
        (out.float().sum() + c.float().sum()).backward()

    return _median_ms(forward, x.device), _median_ms(forward_backward, x.device)


def time_all(cands: list[Candidate], device: torch.device, dtypes, shape: dict, passed: set) -> list[Row]:
    rows = []
    for dtype_name in dtypes:
        with matmul_precision(dtype_name):
            rows += _time_candidates(cands, device, dtype_name, shape, passed)
    return rows


def _time_candidates(cands: list[Candidate], device: torch.device, dtype_name: str, shape: dict,
                     passed: set) -> list[Row]:
    """time_all's rows of one precision: nn.LSTM, then every candidate whose plans passed verification."""
    from . import FusedLSTM

    rows = []
    lstm, x, label = _timing_problem(device, dtype_name, shape)
    nn_times = _step_times(lstm, x)
    for cand in cands:
        if (cand.backend, cand.variant, dtype_name) not in passed:
            continue
        # the kernels users get: only plans that passed their verification
        native_path = native_outright() if cand.backend == "native" else contextlib.nullcontext()
        with environment_set(cand.env), native_path:
            fused = FusedLSTM.from_torch(lstm, backend=cand.backend if cand.backend != "native" else "auto")
            try:
                times = _step_times(fused, x)
            except Exception as error:  # noqa: BLE001 - reported as a failed row
                rows.append(_failed_time_row(cand.backend, cand.variant, dtype_name, label, error))
                continue
        rows.append(_time_row(cand.backend, cand.variant, dtype_name, label, shape["T"], times, nn_times))
    return rows


# ---- the report ----------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return ""
    return "inf" if math.isinf(value) else f"{value:.{digits}g}"


COLUMNS = ["kind", "backend", "variant", "dtype", "shape", "ok", "max_error", "fwd_us_per_step",
           "fwd_bwd_us_per_step", "nn_lstm_fwd_us_per_step", "nn_lstm_fwd_bwd_us_per_step", "detail"]


def write_report(out: Path, info: dict, unavailable: dict, rows: list[Row]) -> tuple[Path, Path]:
    from .environment import header_lines

    out.mkdir(parents=True, exist_ok=True)
    header = header_lines(info)
    csv_path, md_path = out / "check.csv", out / "check.md"
    with csv_path.open("w", newline="") as f:
        for line in header:
            f.write(f"# {line}\n")
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([r.kind, r.backend, r.variant, r.dtype, r.shape, r.ok, _fmt(r.max_error), _fmt(r.fwd_us),
                             _fmt(r.fwd_bwd_us), _fmt(r.nn_fwd_us), _fmt(r.nn_fwd_bwd_us), r.detail])
    failed = [r for r in rows if not r.ok]
    lines = ["# lstm_kernels check", "", *[f"- {line}" for line in header], "",
             f"**{'FAILED: ' + str(len(failed)) + ' of ' + str(len(rows)) if failed else 'passed: all ' + str(len(rows))}**"
             " checks", "", "## Backends", ""]
    lines += [f"- available: {', '.join(info['backends'].split(',')) or 'none'}"]
    lines += [f"- unavailable: {name}: {why}" for name, why in unavailable.items()]
    lines += ["", "## Verification (prefix forward and backward against float64)", "",
              "| backend | variant | dtype | shape | result | largest relative error |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.kind == "verify"):
        result = "pass" if r.ok else "FAIL: " + r.detail
        if r.ok and r.detail.startswith("not served"):
            result = r.detail
        lines.append(f"| {r.backend} | {r.variant} | {r.dtype} | {r.shape} | {result} | {_fmt(r.max_error)} |")
    timed = [r for r in rows if r.kind == "time"]
    if timed:
        lines += ["", "## µs per step (median; nn.LSTM timed in the same run)", "",
                  "| backend | variant | dtype | shape | forward | nn.LSTM | forward+backward | nn.LSTM | ratios |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            lines.append(f"| {r.backend} | {r.variant} | {r.dtype} | {r.shape} | {_fmt(r.fwd_us)} | {_fmt(r.nn_fwd_us)} |"
                         f" {_fmt(r.fwd_bwd_us)} | {_fmt(r.nn_fwd_bwd_us)} | {r.detail} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def run_check(out: Path, backends: Optional[Sequence[str]] = None, quick: bool = False,
              timing: bool = True) -> int:
    """The check on this machine: 0 when everything passed, 1 otherwise."""
    import lstm_kernels

    from . import environment
    from .backends import known_backends

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    known_backends()
    names = list(backends) if backends else lstm_kernels.available_backends()
    unavailable = lstm_kernels.unavailable_backends()
    cands = candidates(names)
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if quick:
        shapes = shapes[:2] + [s for s in shapes if s[4] != "lstm"][:1]  # and one GRU call
    dtypes = [d for d in DTYPES if on_gpu or d != "tf32"]  # TF32 is a GPU's
    steps = 6 if on_gpu else 3
    info = environment.collect(device.type)
    print("\n".join(environment.header_lines(info)))
    print(f"available: {names}; unavailable: {unavailable}")
    rows = verify_all(cands, device, shapes, dtypes, steps)
    rows.append(check_native_path(device))
    passed = {(r.backend, r.variant, r.dtype) for r in rows if r.kind == "verify" and r.ok}
    failed_plans = {(r.backend, r.variant, r.dtype) for r in rows if r.kind == "verify" and not r.ok}
    passed -= failed_plans
    if timing:
        timed_cands = [c for c in cands if not (c.backend == "triton" and not on_gpu)]  # the interpreter is no timing
        timed_cands.append(Candidate("native", "-", lambda: None, {}))
        timed_dtypes = dtypes if on_gpu else ["fp32"]
        passed |= {("native", "-", d) for d in timed_dtypes}
        shape = FLAGSHIP if on_gpu else CPU_TIMING
        rows += time_all(timed_cands, device, timed_dtypes, shape, passed)
        if on_gpu:
            rows += time_auto(device, timed_dtypes, shape)
    csv_path, md_path = write_report(Path(out), info, unavailable, rows)
    failed = [r for r in rows if not r.ok]
    for r in failed:
        print(f"FAILED {r.kind} {r.backend} {r.variant} {r.dtype} {r.shape}: {r.detail}")
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed; wrote {md_path} and {csv_path}")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_kernels check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lstm_kernels_check"), help="folder of check.md and check.csv")
    parser.add_argument("--backends", help="comma-separated backends to check (default: every available one)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--no-timing", action="store_true", help="verification only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels run on the CPU under the interpreter
    backends = [b for b in args.backends.split(",") if b] if args.backends else None
    return run_check(args.out, backends, quick=args.quick, timing=not args.no_timing)
