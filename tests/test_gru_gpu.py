"""The GRU on a real GPU: the cuda backend's fused and per-step kernels and the triton backend's
(persistent, and per-step in float32 without TF32), against the reference, and FusedGRU against
nn.GRU, packed input included.

Marked ``gpu`` (skipped without CUDA). The rule of tests/test_cuda_gpu.py: against the float64
reference on the same rounded inputs, the relative error of every output and gradient is at most
max(REL_TOL[dtype], 2 x the reference backend's own error in that dtype), element-wise within
ELEMENT_FACTOR of that.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lstm_kernels import FusedGRU, gru_layer
from lstm_kernels.backends import get_backend, known_backends
from utils import REL_TOL, assert_rel_close, rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]

known_backends()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (T, B, H): one step; H and B off the 16-tiles; a longer sequence at the flagship width.
SHAPES = {"T1_B1_H13": (1, 1, 13), "T7_B3_H100": (7, 3, 100), "T64_B16_H768": (64, 16, 768)}


def _backend_or_skip(name: str) -> None:
    why = get_backend(name).unavailable_reason()
    if why is not None:
        pytest.skip(f"{name} backend unavailable: {why}")


def _run(backend, leaves, weights, dtype, resets, batch_sizes=None):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    h_all, h_T = gru_layer(*leaves, backend=backend, resets=resets, batch_sizes=batch_sizes)
    loss = (h_all.double() * weights[0]).sum() + (h_T.double() * weights[1]).sum()
    return [h_all, h_T, *torch.autograd.grad(loss, leaves)]


#: (backend, LSTM_KERNELS_CUDA_VARIANT): the cuda backend's fused kernels and its per-step kernels.
KERNELS = {"cuda_fused": ("cuda", "fused"), "cuda_step": ("cuda", "step"), "triton": ("triton", None)}


@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("with_resets", [False, True], ids=["", "resets"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_gru_layer_matches_the_reference(dt, shape, with_resets, kernels, monkeypatch):
    backend, variant = KERNELS[kernels]
    _backend_or_skip(backend)
    if variant is not None:
        from lstm_kernels.backends import cuda as cuda_backend

        monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)
    T, B, H = SHAPES[shape]
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.randn(T, B, 3 * H, generator=gen) * 0.7, torch.randn(3 * H, H, generator=gen) / H ** 0.5,
           torch.randn(B, H, generator=gen) * 0.5, torch.randn(H, generator=gen) * 0.3]
    leaves = [t.cuda().to(dtype).double() for t in cpu]  # the same rounded inputs for every run
    weights = (torch.randn(T, B, H, generator=gen, dtype=torch.float64).cuda(),
               torch.randn(B, H, generator=gen, dtype=torch.float64).cuda())
    resets = (torch.rand(T, B, generator=gen) < 0.2).cuda() if with_resets else None
    actual = _run(backend, leaves, weights, dtype, resets)
    expected = _run("reference", leaves, weights, torch.float64, resets)
    own = _run("reference", leaves, weights, dtype, resets)
    for name, a, e, o in zip(("h_all", "h_T", "dxg", "dw_hh", "dh0", "db_hn"), actual, expected, own):
        tol = max(REL_TOL[dtype], 2 * rel_error(o.double(), e))
        assert_rel_close(a.double(), e, tol, f"{kernels} {dt} {name}")
    if variant is not None:
        ran = get_backend("cuda")
        want = ("fused",) if variant == "fused" else ("wmma", "fma")
        assert ran.last_forward_kernel in want and ran.last_backward_kernel in want, (ran.last_forward_kernel,
                                                                                      ran.last_backward_kernel)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_packed_gru_on_the_fused_kernels(dt):
    """Variable lengths (only the fused kernels serve them on the cuda backend), with and without
    gradients."""
    _backend_or_skip("cuda")
    dtype = DTYPES[dt]
    T, B, H = 9, 5, 40
    gen = torch.Generator().manual_seed(1)
    cpu = [torch.randn(T, B, 3 * H, generator=gen) * 0.7, torch.randn(3 * H, H, generator=gen) / H ** 0.5,
           torch.randn(B, H, generator=gen) * 0.5, torch.randn(H, generator=gen) * 0.3]
    leaves = [t.cuda().to(dtype).double() for t in cpu]
    weights = (torch.randn(T, B, H, generator=gen, dtype=torch.float64).cuda(),
               torch.randn(B, H, generator=gen, dtype=torch.float64).cuda())
    batch_sizes = torch.tensor([5, 5, 4, 4, 3, 2, 2, 1, 1])
    actual = _run("cuda", leaves, weights, dtype, None, batch_sizes)
    expected = _run("reference", leaves, weights, torch.float64, None, batch_sizes)
    own = _run("reference", leaves, weights, dtype, None, batch_sizes)
    for name, a, e, o in zip(("h_all", "h_T", "dxg", "dw_hh", "dh0", "db_hn"), actual, expected, own):
        assert_rel_close(a.double(), e, max(REL_TOL[dtype], 2 * rel_error(o.double(), e)), f"packed {dt} {name}")
    assert get_backend("cuda").last_backward_kernel == "fused"
    with torch.no_grad():
        h_all, h_T = gru_layer(*[t.to(dtype) for t in leaves], backend="cuda", batch_sizes=batch_sizes)
    assert_rel_close(h_all.double(), expected[0], max(REL_TOL[dtype], 2 * rel_error(own[0].double(), expected[0])),
                     "no-grad h_all")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_gru_matches_nn_gru(backend, bidirectional):
    _backend_or_skip(backend)
    torch.manual_seed(0)
    expected_module = nn.GRU(24, 40, num_layers=2, bidirectional=bidirectional, device="cuda", dtype=torch.float64)
    fused = FusedGRU.from_torch(expected_module, backend=backend).float()
    x = torch.randn(9, 5, 24, device="cuda", dtype=torch.float64)
    out, h = fused(x.float())
    expected, expected_h = expected_module(x)
    assert_rel_close(out.double(), expected, REL_TOL[torch.float32], "output")
    assert_rel_close(h.double(), expected_h, REL_TOL[torch.float32], "h_n")
    ran = get_backend(backend)
    if backend == "cuda":
        assert ran.last_forward_kernel == "fused"
