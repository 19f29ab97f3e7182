"""One forward and backward of each implementation at the flagship shape, for a kernel profiler.

``scripts/gpu_checks.sh profile`` runs this under Nsight Compute (ncu) to answer where a step's
time goes: nn.LSTM (cuDNN), FusedLSTM on each variant of the ``cuda`` backend's fused kernels
(``FUSED_CANDIDATES``: W_hh in shared memory or in registers, h exchanged through the grid barrier or
tagged, the backward's blocks of 8 units, of 16, or of 16 units x 8 rows), and on the ``triton`` backend's persistent
kernels. Each runs once to warm up (compile, verify before first use), then once inside
an NVTX range named after it, which ncu's ``--nvtx --nvtx-include`` selects, so only the measured
launches are profiled.

    python -m benchmarks.profile_flagship [--T 64] [--B 16] [--H 768] [--dtype fp16|bf16|fp32|tf32] [--impl NAME ...]
    python -m benchmarks.profile_flagship --list     # the implementations, one per line
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from lstm_kernels.backends.cuda.variants import FUSED_CANDIDATES
from lstm_kernels.check import DTYPES, environment_set, matmul_precision

#: name -> (FusedLSTM backend, or None for nn.LSTM; the environment that selects the variant)
RUNS = {
    "cudnn": (None, {}),
    **{"cuda-" + label.replace("+", "-"): ("cuda", env) for label, env in FUSED_CANDIDATES.items()},
    "triton-persistent": ("triton", {"LSTM_KERNELS_TRITON_VARIANT": "persistent"}),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_flagship", description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=64, help="steps (default 64: enough steady-state steps, a short profile)")
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--H", type=int, default=768, help="hidden size; the input size is the same")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                   help="fp16, bf16, fp32 (fp32 accuracy) or tf32 (float32 with torch's TF32 flag set)")
    p.add_argument("--impl", nargs="*", choices=sorted(RUNS), help="implementations (default: all)")
    p.add_argument("--list", action="store_true", help="print the implementations and exit")
    return p


def module_for(name: str, H: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """nn.LSTM, or a FusedLSTM on the run's backend, with the same weights (one layer, input size H)."""
    torch.manual_seed(0)
    reference = torch.nn.LSTM(H, H, device=device, dtype=dtype)
    backend, _ = RUNS[name]
    if backend is None:
        return reference
    from lstm_kernels import FusedLSTM

    fused = FusedLSTM(H, H, device=device, dtype=dtype, backend=backend)
    fused.load_state_dict(reference.state_dict())
    return fused


def run_once(module: torch.nn.Module, x: torch.Tensor) -> None:
    out, (h, c) = module(x)
    (out.float().sum() + c.float().sum()).backward()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.impl or list(RUNS)
    if args.list:
        print("\n".join(names))
        return 0
    if not torch.cuda.is_available():
        print("profile_flagship: needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    x = torch.randn(args.T, args.B, args.H, device=device, dtype=dtype)
    for name in names:
        with environment_set(RUNS[name][1]), matmul_precision(args.dtype):
            module = module_for(name, args.H, dtype, device)
            run_once(module, x)  # warm-up: compile, verify before first use
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push(name)
            run_once(module, x)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        print(f"{name}: T={args.T} B={args.B} H={args.H} {args.dtype} profiled", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
