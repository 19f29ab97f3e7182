"""Small forward + backward runs of the GPU backends, for compute-sanitizer on a GPU
(scripts/gpu_checks.sh sanitize runs memcheck, racecheck, synccheck and initcheck on it,
with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/sanitize_cuda.py
    python tests/sanitize_cuda.py --backend cuda      # one backend only (default: cuda and triton)

Backends and variants: ``cuda`` fused (the default: the fused kernels of csrc/fused/,
persistent where their grid is co-resident; float32 both at fp32 accuracy and on tf32), its
variants of variants.FUSED_CANDIDATES (W in registers, the tagged exchange; 16 bits), persistent
(the fused kernels' persistent launch only) and step (the per-step kernels of csrc/step/, with both
matmuls: tensor cores, FMA); ``triton`` step and persistent. Shapes cover tails in every tile dimension (H and B not
multiples of 16, 4H not of 32), T = 1, every dtype; for ``cuda`` fused and step, projected
(proj_size) and variable-length (batch_sizes) calls too, which only the fused kernels serve
(``step``: one launch per half-step). A persistent case the fused kernels cannot run here (their
plan, or what they serve) is reported and skipped, not counted as a failure.
Exits non-zero if a backend that was asked for is unavailable, a call raises, or a
result is non-finite.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

from lstm_kernels.backends import RecurrenceInputs, get_backend

SHAPES = [(1, 1, 1), (1, 3, 13), (3, 17, 40), (4, 16, 32), (2, 33, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ("cuda", "triton")
CUDA_VARIANT_ENV = "LSTM_KERNELS_CUDA_VARIANT"
CUDA_MMA_ENV = "LSTM_KERNELS_CUDA_MMA"
TRITON_VARIANT_ENV = "LSTM_KERNELS_TRITON_VARIANT"


#: (T, B, H, P, variable lengths) of the projected and packed calls.
CONTRACT_SHAPES = [(3, 5, 24, 7, False), (4, 17, 40, 16, True), (2, 3, 13, None, True)]


def configurations(backend: str):
    """(label, environment, TF32 allowed) of every variant (and matmul) of ``backend`` to sanitize.
    Every CUDA configuration sets all of the fused kernels' variables (those of the default, where
    it does not name another), so none inherits the previous one's."""
    if backend == "cuda":
        from lstm_kernels.backends.cuda.variants import FUSED_CANDIDATES

        base = {CUDA_MMA_ENV: "1", **FUSED_CANDIDATES["fused"]}
        for tf32 in (False, True):
            yield f"cuda/fused/{'tf32' if tf32 else 'fp32'}", base, tf32
        for label, env in FUSED_CANDIDATES.items():
            if label != "fused":
                yield f"cuda/{label}", {**base, **env}, True
        yield "cuda/persistent", {**base, CUDA_VARIANT_ENV: "persistent"}, True
        for mma in ("1", "0"):
            yield f"cuda/step/{'mma' if mma == '1' else 'fma'}", {**base, CUDA_MMA_ENV: mma, CUDA_VARIANT_ENV: "step"}, True
    else:
        for variant in ("step", "persistent"):
            yield f"triton/{variant}", {TRITON_VARIANT_ENV: variant}, True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="backend to run (repeatable; default: all of %(choices)s)")
    args = parser.parse_args(argv)
    print(f"PYTORCH_NO_CUDA_MEMORY_CACHING={os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING', '')}")
    bad = 0
    for name in args.backend or BACKENDS:
        try:
            backend = get_backend(name)
        except ValueError as e:
            print(f"{name} backend unknown here: {e}")
            bad += 1
            continue
        why = backend.unavailable_reason()
        if why is not None:
            print(f"{name} backend unavailable: {why}")
            bad += 1
            continue
        for label, env, tf32 in configurations(name):
            os.environ.update(env)
            torch.backends.cuda.matmul.allow_tf32 = tf32  # fp32 on tf32 tensor cores, or at fp32 accuracy
            bad += run_all(backend, label)
    print(f"sanitize_cuda: {'FAILED (' + str(bad) + ')' if bad else 'ok'}")
    return 1 if bad else 0


def persistent_impossible(label: str, dtype, B: int, H: int, P, varlen: bool) -> str | None:
    """Why the fused kernels' persistent launch cannot run this case here, or None (only for
    cuda/persistent: the other variants fall back themselves)."""
    if not label.startswith("cuda/persistent"):
        return None
    from lstm_kernels.backends import RecurrenceCall
    from lstm_kernels.backends import cuda as cuda_backend

    call = RecurrenceCall(seq_len=1, batch=B, hidden_size=H, state_size=P or H, dtype=dtype,
                          device=torch.device("cuda"), has_projection=P is not None, variable_lengths=varlen,
                          needs_grad=True)
    why = cuda_backend.fused_unserved_reason(call)
    if why is not None:
        return why
    for direction in ("forward", "backward"):
        if not cuda_backend.fused_persistent_possible(call.device, direction, dtype, B, H, P or H):
            return f"{direction}: the fused grid is not co-resident here"
    return None


def _cases(label):
    """(T, B, H, P, variable lengths) of ``label``'s runs."""
    cases = [(T, B, H, None, False) for T, B, H in SHAPES]
    if label.startswith(("cuda/fused", "cuda/persistent", "cuda/step")):
        cases += CONTRACT_SHAPES
    return cases


def _dtypes(label):
    """The fused variants past the default (W in registers, the tagged exchange) differ from it only
    in 16 bits; float32 under them is the default's run again."""
    if label.startswith("cuda/fused+"):
        return [d for d in DTYPES if d != torch.float32]
    return DTYPES


def run_all(backend, label) -> int:
    bad = 0
    for dtype in _dtypes(label):
        for T, B, H, P, varlen in _cases(label):
            case = f"{label:22s} {str(dtype):15s} T={T} B={B} H={H} P={P} varlen={varlen}"
            why = persistent_impossible(label, dtype, B, H, P, varlen)
            if why is not None:
                print(f"{case}: skipped ({why})")
                continue
            g = torch.Generator().manual_seed(T * 1000 + B * 10 + H)
            rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).cuda()  # noqa: E731
            K = H if P is None else P
            xg, w_hh, h0, c0 = rnd(T, B, 4 * H), rnd(4 * H, K) * K**-0.5, rnd(B, K), rnd(B, H)
            w_hr = None if P is None else rnd(P, H) * H**-0.5
            bs = None
            if varlen:  # lengths T, ..., 1 (non-increasing), the batch sizes of a PackedSequence
                lengths = torch.arange(B, 0, -1).clamp(max=T)
                lengths[0] = T
                bs = torch.tensor([int((lengths > t).sum()) for t in range(T)])
            for needs_grad in (False, True):
                try:
                    h_all, h_T, c_T, ws = backend.forward(xg, w_hh, h0, c0, w_hr, bs, needs_grad)
                    outs = [h_all, h_T, c_T]
                    if needs_grad:
                        inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, bs)
                        dG, dh0, dc0, dw_hr = backend.backward(inputs, h_all, ws, rnd(T, B, K), rnd(B, K), rnd(B, H))
                        outs += [dG, dh0, dc0] + ([] if dw_hr is None else [dw_hr])
                    torch.cuda.synchronize()
                    ok = all(bool(torch.isfinite(o).all()) for o in outs)
                    status = "ok" if ok else "NON-FINITE"
                except Exception:  # report every failing case, then fail the run
                    ok, status = False, "RAISED\n" + traceback.format_exc()
                bad += not ok
                print(f"{case} needs_grad={needs_grad}: {status}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
