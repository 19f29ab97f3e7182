"""The cuda backend with resets inside a sequence, on a GPU (skipped without one).

Every dtype (float32 at fp32 accuracy and on TF32, bfloat16, float16) and every variant that serves
resets (``fused`` and ``auto``: the fused kernels, persistent where their grid is co-resident, else one
launch per half-step; ``step``: the per-step kernels), against the reference backend in float64 on
the same rounded inputs: h_all, h_T, c_T and the gradients of xg, w_hh, h0, c0 (and w_hr with a
projection), with reset patterns at the first step, the last step, adjacent steps, every row at one
step, and none. A projection and variable lengths (fused kernels only) with resets too, and the
``persistent`` variant (the fused kernels' persistent launch).
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends import get_backend
from lstm_kernels.backends import cuda as cuda_backend
from lstm_kernels.backends.cuda import fused as cuda_fused
from lstm_kernels.function import lstm_layer
from utils import REL_TOL, assert_rel_close, rel_error

_C = pytest.importorskip("lstm_kernels._C")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.is_available() and get_backend("cuda").unavailable_reason() is not None,
        reason=f"cuda backend unavailable: {get_backend('cuda').unavailable_reason()}",
    ),
]

DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False),
          "fp16": (torch.float16, False)}
VARIANTS = ["fused", "step", "auto"]
# (T, B, H): B and H off the tiles (16 rows, 8 / 16 units), one batch tile and several, the flagship width.
SHAPES = {"T7_B3_H13": (7, 3, 13), "T9_B17_H100": (9, 17, 100), "T12_B33_H64": (12, 33, 64),
          "T6_B16_H768": (6, 16, 768)}
PATTERNS = ["none", "first", "last", "adjacent", "all-rows", "random"]


def make_resets(pattern: str, T: int, B: int) -> torch.Tensor:
    r = torch.zeros(T, B, dtype=torch.bool)
    if pattern == "first":
        r[0, ::2] = True
    elif pattern == "last":
        r[T - 1, 1::2] = True
    elif pattern == "adjacent":
        r[1:4, 0] = True
        r[2:4, B - 1] = True
    elif pattern == "all-rows":
        r[T // 2] = True
    elif pattern == "random":
        r = torch.rand(T, B, generator=torch.Generator().manual_seed(1)) < 0.3
    return r.cuda()


def make_case(T, B, H, dtype, P=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = H if P is None else P

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).cuda()

    inputs = dict(xg=rnd(T, B, 4 * H), w_hh=rnd(4 * H, P, scale=P**-0.5), h0=rnd(B, P, scale=0.5), c0=rnd(B, H))
    if P != H:
        inputs["w_hr"] = rnd(P, H, scale=H**-0.5)
    return inputs, (rnd(T, B, P), rnd(B, P), rnd(B, H))


def run_layer(inputs, cotangents, backend, resets, batch_sizes=None, dtype=None):
    leaves = {k: (v.to(dtype) if dtype else v).detach().requires_grad_(True) for k, v in inputs.items()}
    outs = lstm_layer(leaves["xg"], leaves["w_hh"], leaves["h0"], leaves["c0"], leaves.get("w_hr"), batch_sizes,
                      backend=backend, resets=resets)
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(cotangents, outs)])
    return {"h_all": outs[0].detach(), "h_T": outs[1].detach(), "c_T": outs[2].detach(),
            **{f"d{k}": v.grad for k, v in leaves.items()}}


def check(inputs, cotangents, dtype, tf32, resets, batch_sizes=None):
    got = run_layer(inputs, cotangents, "cuda", resets, batch_sizes)
    truth = run_layer(inputs, cotangents, "reference", resets, batch_sizes, torch.float64)
    base = run_layer(inputs, cotangents, "reference", resets, batch_sizes)
    tol = REL_TOL["tf32" if tf32 else dtype]
    for name, expected in truth.items():
        assert got[name].dtype == base[name].dtype, name
        assert_rel_close(got[name], expected, max(tol, 2 * rel_error(base[name], expected)), name)


@pytest.fixture
def variant_env(monkeypatch, set_tf32):
    def use(variant, tf32):
        set_tf32(tf32)
        monkeypatch.setenv(cuda_backend.VARIANT_ENV, variant)
    return use


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_resets_against_the_reference(variant_env, dtype_name, variant, shape, pattern):
    dtype, tf32 = DTYPES[dtype_name]
    variant_env(variant, tf32)
    T, B, H = SHAPES[shape]
    inputs, cotangents = make_case(T, B, H, dtype)
    check(inputs, cotangents, dtype, tf32, make_resets(pattern, T, B))
    backend = get_backend("cuda")
    kernels = (backend.last_forward_kernel, backend.last_backward_kernel)
    if variant in ("fused", "auto"):
        assert kernels == ("fused", "fused"), kernels
    else:
        assert "fused" not in kernels and (backend.last_forward_variant, backend.last_backward_variant) == (
            "step", "step"), kernels


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-step"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fused_launch_modes_with_resets(variant_env, monkeypatch, dtype_name, persistent):
    """Both launch modes of the fused kernels (one cooperative launch; one launch per half-step)."""
    dtype, tf32 = DTYPES[dtype_name]
    variant_env("fused", tf32)
    if not persistent:
        monkeypatch.setattr(cuda_fused, "fused_persistent_possible", lambda *a, **k: False)
    T, B, H = 10, 20, 96
    if persistent and not all(cuda_backend.fused_persistent_possible(torch.device("cuda"), d, dtype, B, H, H, True)
                              for d in ("forward", "backward")):
        pytest.skip("the fused grid is not co-resident here")
    inputs, cotangents = make_case(T, B, H, dtype, seed=2)
    check(inputs, cotangents, dtype, tf32, make_resets("random", T, B))
    backend = get_backend("cuda")
    expected = "persistent" if persistent else "step"
    assert (backend.last_forward_variant, backend.last_backward_variant) == (expected, expected)


@pytest.mark.parametrize("pattern", ["first", "adjacent", "random"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_resets_with_projection_and_variable_lengths(variant_env, dtype_name, pattern):
    dtype, tf32 = DTYPES[dtype_name]
    variant_env("fused", tf32)
    T, B, H, P = 8, 6, 40, 24
    inputs, cotangents = make_case(T, B, H, dtype, P=P, seed=3)
    check(inputs, cotangents, dtype, tf32, make_resets(pattern, T, B))
    batch_sizes = torch.tensor([6, 6, 5, 5, 3, 2, 2, 1])
    inputs, cotangents = make_case(T, B, H, dtype, seed=4)
    check(inputs, cotangents, dtype, tf32, make_resets(pattern, T, B), batch_sizes)


def test_the_persistent_variant_serves_resets(variant_env):
    """``persistent`` is the fused kernels' persistent launch, which serves resets."""
    variant_env("persistent", False)
    T, B, H = 5, 3, 13
    if not all(cuda_backend.fused_persistent_possible(torch.device("cuda"), d, torch.float16, B, H, H, True)
               for d in ("forward", "backward")):
        pytest.skip("the fused grid is not co-resident here")
    inputs, cotangents = make_case(T, B, H, torch.float16)
    check(inputs, cotangents, torch.float16, False, make_resets("first", T, B))
    backend = get_backend("cuda")
    assert (backend.last_forward_kernel, backend.last_backward_kernel) == ("fused", "fused")
    assert (backend.last_forward_variant, backend.last_backward_variant) == ("persistent", "persistent")
