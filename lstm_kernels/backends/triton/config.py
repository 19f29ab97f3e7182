"""What every launch of the Triton kernels shares: the variant names, the numerics of tl.dot, the
buffers a forward / backward writes, the reset words, the barrier arguments, the device guard.

Dimension names: T steps, B batch rows, H hidden units, P state size (proj_size or H), 4H the gate
axis in PyTorch's order i, f, g, o (gate k of unit j is column k*H + j).

Variable lengths: ``bs [T + 1]`` int32 holds the active rows per step and bs[T] = 0
(``device_rows.step_rows``). Step t updates rows [0, bs[t]); other rows keep h and c and get 0
in h_all and in dG. In backward, rows not active at t+1 carry dh_T (they are never active after t).

Resets inside a sequence (HAS_RESETS, a constexpr of every kernel: without resets they compile as
if there were none): ``rst [T + 2, cdiv(B, 64)]`` int64 holds resets[t] as bits, row r in bit
r % 64 of word [t + 1, r // 64], and zero words for the steps -1 and T (``reset_rows``), so that
every kernel reads steps t - 1 and t + 1 without a bound check. A row that resets at t starts
step t from zero state, applied where the state enters step t, to the copy each program reads:
h_{t-1} counts as 0 for those rows and c_{t-1} is replaced by 0 in the cell update; the buffers
and the kept h / c of inactive rows are untouched. In the backward the gradients leave step t
masked: dc_{t-1} = dc_t * f is 0 for those rows, c_{t-1} read for the forget-gate gradient is 0
(the value the forward used), and dh_{t-1} = dG_t W_hh is 0 for them, so dh0 is 0 where row b
resets at step 0; dG_t itself is unchanged. A reset on a row not active at t changes nothing.

Host side: launches run under a device guard of the tensors' device, on its current stream, and
nothing in a call's path synchronises with the host (``device_rows.step_rows``), so every variant
can be captured in a CUDA graph.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ...cells import LSTM
from .. import barrier_bound
from ..barrier_bound import BARRIER_TIMEOUT_ENV  # noqa: F401  (the bound's switch, shared with the cuda backend)

#: Environment variable that forces a variant: "auto" (default), "step" or "persistent".
VARIANT_ENV = "LSTM_KERNELS_TRITON_VARIANT"
VARIANTS = ("auto", "step", "persistent")

#: The kernels the last call ran, per direction: "step_budget" (the persistent kernels of
#: persistent_forward / persistent_backward) or "step" (one launch per step: step_forward /
#: step_backward), so that a test that claims a kernel can check it ran (as the cuda backend's
#: last_forward_kernel).
LAST_KERNELS: dict = {"forward": None, "backward": None}


def record_kernel(direction: str, kernel: str) -> None:
    LAST_KERNELS[direction] = kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_variant(variant: str) -> str:
    """``variant``, with "auto" replaced by the environment variable's choice where it names one;
    ValueError for an unknown name."""
    if variant == "auto":
        variant = os.environ.get(VARIANT_ENV, "auto") or "auto"
    if variant not in VARIANTS:
        raise ValueError(f"unknown Triton LSTM variant {variant!r}; choose one of {VARIANTS}")
    return variant


def dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """input_precision of tl.dot: (h @ W_hh^T, every product with an fp32 operand).

    The forward gate product multiplies h and W_hh in the input dtype (16-bit products are
    exact in fp32); fp32 uses tf32 only when torch.backends.cuda.matmul.allow_tf32 is set.
    The other products (dG @ W_hh in the step kernels, m @ W_hr^T, dh @ W_hr) have an fp32
    operand: for 16-bit inputs they use tf32 (the weights are exact in tf32, whose 10-bit
    mantissa is finer than bf16's), for fp32 inputs the same rule as the forward.
    """
    fp32 = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.float32:
        return fp32, fp32
    return "ieee", "tf32"


def float32_accuracy(dtype: torch.dtype) -> bool:
    """Whether kernels for ``dtype`` compute at float32 accuracy (float32 without TF32, what
    dot_precisions gives it): their cell divides correctly rounded (device_helpers._sigmoid)."""
    return dtype == torch.float32 and dot_precisions(dtype)[0] == "ieee"


def forward_dot_dtype(dtype: torch.dtype):
    """Operand dtype of the 16-bit tl.dot: the input dtype, except bfloat16 under the interpreter.

    The interpreter (Triton 3.6) computes tl.dot on bfloat16 operands wrongly (it sees the
    raw bits), so there the operands are upcast to fp32: bf16 products are exact in fp32,
    so the result is the same as on a GPU up to summation order.
    """
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def reset_rows(resets, seq_len: int, batch: int, placeholder):
    """The kernels' ``rst`` argument: [T + 2, cdiv(B, 64)] int64 on resets' device, bit r % 64 of
    word [t + 1, r // 64] set where resets[t, r], and zero words for the steps -1 and T (read
    without a bound check); ``placeholder`` (never read: HAS_RESETS is False) where ``resets`` is
    None. Made on the device, no host sync."""
    if resets is None:
        return placeholder
    words = triton.cdiv(batch, 64)
    bits = torch.zeros((seq_len + 2, words * 64), dtype=torch.int64, device=resets.device)
    bits[1:seq_len + 1, :batch] = resets
    shifts = torch.arange(64, dtype=torch.int64, device=resets.device)
    # distinct bits: the sum is their OR (bit 63 wraps to the sign, as int64 holds it)
    return (bits.view(seq_len + 2, words, 64) << shifts).sum(dim=2)


def forward_buffers(xg, h0, c0, P: int, has_proj: bool, store_workspace: bool, n_gates: int = 4):
    """The tensors a forward launch writes, shared by both kernel sets.

    Returns h_buf [2, B, P] (h0 in slot 0; step t reads slot t % 2 and writes slot (t + 1) % 2),
    c [B, H] fp32 (c0 on entry, c_T on exit; for the GRU, c0 None, an alias of h_buf never
    touched), h_all [T, B, P], m_buf [B, H] fp32 (an alias of c without a projection: never
    touched), the workspace (gates [T, B, n_gates*H], c_all [T, B, H] (the GRU's hn) (+ m_all
    [T, B, H]) fp32, or ()) and the three workspace arguments of the kernels (placeholders never
    written where absent).
    """
    T, B, gate_rows = xg.shape
    H, dtype, device = gate_rows // n_gates, xg.dtype, xg.device
    h_buf = torch.empty((2, B, P), dtype=dtype, device=device)
    h_buf[0].copy_(h0)
    c = h_buf if c0 is None else c0.to(torch.float32).contiguous().clone()
    h_all = torch.empty((T, B, P), dtype=dtype, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    m_buf = torch.empty((B, H), **f32) if has_proj else c
    ws = ()
    if store_workspace:
        ws = (torch.empty((T, B, gate_rows), **f32), torch.empty((T, B, H), **f32))
        ws += (torch.empty((T, B, H), **f32),) if has_proj else ()
    return h_buf, c, h_all, m_buf, ws, (ws + (c, c, c))[:3]


def recurrent_bias(b_hn, cell: str, hidden: int, like):
    """The kernels' ``b_hn`` argument: the GRU's b_hn [H] (zeros where the layer has no bias), and
    for the LSTM ``like`` (a placeholder, never read)."""
    if cell == LSTM:
        return like
    if b_hn is None:
        return torch.zeros(hidden, dtype=like.dtype, device=like.device)
    return b_hn.contiguous()


def backward_buffers(dc_T, dh_T, T: int, P: int, has_proj: bool):
    """The fp32 state a backward launch writes, shared by both kernel sets: dc [B, H] (dc_T on
    entry, dc0 on exit; for the GRU, dc_T None, the carry [2, B, H] of dh_t * z_t, zeros), dh0
    [B, P], and with a projection dh_buf [B, P] and dh_hist [T, B, P] (dh_t on active rows, 0
    elsewhere); without one both alias dh0, never touched."""
    B, device = dh_T.shape[0], dh_T.device
    f32 = dict(dtype=torch.float32, device=device)
    dc = torch.zeros((2, B, P), **f32) if dc_T is None else dc_T.to(torch.float32).contiguous().clone()
    dh0 = torch.empty((B, P), **f32)
    dh_buf = torch.empty((B, P), **f32) if has_proj else dh0
    dh_hist = torch.zeros((T, B, P), **f32) if has_proj else dh0
    return dc, dh0, dh_buf, dh_hist


def projection_weight_grad(dh_hist, m_all):
    """dW_hr [P, H] = sum_t dh_t^T m_t: one deterministic GEMM (dh_hist is 0 on inactive rows)."""
    T, B, P = dh_hist.shape
    return dh_hist.reshape(T * B, P).t() @ m_all.reshape(T * B, m_all.shape[-1])


def device_guard(device: torch.device):
    """The device every launch runs on: Triton launches on the current CUDA device and its
    current stream, so make that the tensors' device (as the CUDA backend does)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


#: The runtime barrier arguments of the persistent kernels that are never specialised (one binary
#: for every bound): for triton.jit(do_not_specialize=...).
BARRIER_RUNTIME_ARGS = ("timeout_ns", "kernel_code")


def barrier_args(device, kernel: str) -> tuple:
    """The barrier arguments of a persistent launch of ``kernel`` (a ``barrier_bound.KERNELS`` name):
    the zeroed per-launch state (int32 [2]: arrival counter, gave up), the device's error record,
    the bound in ns (0: none) and the kernel's code. After the launch: ``barrier_bound.after_launch``."""
    return (torch.zeros(2, dtype=torch.int32, device=device), barrier_bound.device_record(device),
            barrier_bound.barrier_timeout_ns(), barrier_bound.kernel_code(kernel))


# ----------------------------------------------------------------------------- the step kernels' tiles


def step_config(hidden: int, batch: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps of the step kernels for one (H, B, dtype): the one place their launch
    parameters are chosen. ``hidden`` is max(H, P): BLOCK_H tiles both H and P, BLOCK_K steps every
    k-loop.

    tl.dot needs every block dimension >= 16, so blocks are at least 16 and masked.
    BLOCK_B covers the batch up to 64 rows; BLOCK_H = 32 hidden units (x 4 gates = 128
    gate columns per program) keeps the four fp32 accumulators at 64 registers per
    thread with 4 warps, 32 with the 8 warps a 64-row block takes (with 4, at H = 1024,
    B = 256, Triton 3.9 spilled 152 bytes in the fp32 forward on sm_80 and Triton 3.6 400
    to 500 in the 16-bit backward: tests/test_triton_aot.py; the warps split the output
    tile, each element's sum over K keeps its order); BLOCK_K = 64 for 16-bit inputs, 32
    for fp32 (shared memory).
    Under the interpreter blocks are as large as the problem allows (up to 64):
    fewer, larger programs run much faster there.
    """
    pow2 = triton.next_power_of_2
    block_b = min(64, max(16, pow2(batch)))
    if interpreting():
        block_h = block_k = min(64, max(16, pow2(hidden)))
        return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=4)
    block_h = min(32, max(16, pow2(hidden)))
    block_k = min(64 if dtype in (torch.float16, torch.bfloat16) else 32, max(16, pow2(hidden)))
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=8 if block_b == 64 else 4)


def num_tiles(hidden: int, batch: int, cfg: dict) -> int:
    """Tiles of BLOCK_B rows x BLOCK_H units over a [batch, hidden] phase: its step launch's grid."""
    return triton.cdiv(batch, cfg["BLOCK_B"]) * triton.cdiv(hidden, cfg["BLOCK_H"])
