"""Small forward + backward runs of the cuda backend, for compute-sanitizer on a GPU:

    compute-sanitizer --tool memcheck python tests/sanitize_cuda.py
    compute-sanitizer --tool racecheck python tests/sanitize_cuda.py
    compute-sanitizer --tool initcheck python tests/sanitize_cuda.py

Shapes cover tails in every tile dimension (H and B not multiples of 16, 4H not
of 32), T = 1, every dtype, both variants and both matmuls (tensor cores, FMA).
Exits non-zero if a result is non-finite.
"""
from __future__ import annotations

import os
import sys

import torch

from lstm_kernels.backends import RecurrenceInputs, get_backend

SHAPES = [(1, 1, 1), (1, 3, 13), (3, 17, 40), (4, 16, 32), (2, 33, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def main() -> int:
    backend = get_backend("cuda")
    why = backend.unavailable_reason()
    if why is not None:
        print(f"cuda backend unavailable: {why}")
        return 1
    bad = 0
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 on tf32 tensor cores too, when the switch is on
    for mma in ("1", "0"):
        os.environ["LSTM_KERNELS_CUDA_MMA"] = mma
        for variant in ("step", "persistent"):
            os.environ["LSTM_KERNELS_CUDA_VARIANT"] = variant
            bad += run_all(backend, f"{variant}/{'mma' if mma == '1' else 'fma'}")
    return 1 if bad else 0


def run_all(backend, variant) -> int:
    bad = 0
    for dtype in DTYPES:
        for T, B, H in SHAPES:
            g = torch.Generator().manual_seed(T * 1000 + B * 10 + H)
            rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).cuda()  # noqa: E731
            xg, w_hh, h0, c0 = rnd(T, B, 4 * H), rnd(4 * H, H) * H**-0.5, rnd(B, H), rnd(B, H)
            for needs_grad in (False, True):
                h_all, h_T, c_T, ws = backend.forward(xg, w_hh, h0, c0, None, None, needs_grad)
                outs = [h_all, h_T, c_T]
                if needs_grad:
                    inputs = RecurrenceInputs(xg, w_hh, h0, c0, None, None)
                    dG, dh0, dc0, _ = backend.backward(inputs, h_all, ws, rnd(T, B, H), rnd(B, H), rnd(B, H))
                    outs += [dG, dh0, dc0]
                torch.cuda.synchronize()
                ok = all(bool(torch.isfinite(o).all()) for o in outs)
                bad += not ok
                print(f"{variant:15s} {str(dtype):15s} T={T} B={B} H={H} needs_grad={needs_grad}: {'ok' if ok else 'NON-FINITE'}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
