"""The triton backend serves the GRU: the per-step kernels with the cell as their parameter (GATES = 3).

``gru_layer(..., backend="triton")`` against the reference backend in float64 on the same inputs:
h_all, h_T and the gradients of xg, W_hh, h0 and b_hn, dense, packed, with resets (at the first
step, inside, every step), without b_hn, over several unit tiles, and in the 16-bit dtypes within
their tolerances. FusedGRU(backend="triton") against nn.GRU on every config and input form of
tests/test_gru.py. Under "persistent" both directions are the persistent kernels' GRU instances
(GATES = 3; under the interpreter in their steps mode), and LAST_KERNELS says so; they also run with
forced tiles (several batch tiles and unit blocks, the last masked). Tiny shapes: the interpreter is
slow.
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels import gru_layer
from lstm_kernels.backends import RecurrenceInputs, get_backend, known_backends
from utils import REL_TOL, assert_rel_close

known_backends()
kernels = pytest.importorskip("lstm_kernels.backends.triton.config")

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
#: float32 runs on TF32 on a GPU where allowed; the tests' GPU runs keep torch's default (off).
TOL = REL_TOL[torch.float32]


def layer_case(T=4, B=3, H=6, seed=0, dtype=torch.float64):
    """float64 leaves of one GRU layer (nn.GRU-like scales) and a fixed weighting of its outputs."""
    gen = torch.Generator().manual_seed(seed)
    xg = torch.randn(T, B, 3 * H, dtype=torch.float64, generator=gen) * 0.7
    w_hh = torch.randn(3 * H, H, dtype=torch.float64, generator=gen) / H ** 0.5
    h0 = torch.randn(B, H, dtype=torch.float64, generator=gen) * 0.5
    b_hn = torch.randn(H, dtype=torch.float64, generator=gen) * 0.3
    weights = (torch.randn(T, B, H, dtype=torch.float64, generator=gen), torch.randn(B, H, dtype=torch.float64,
                                                                                      generator=gen))
    return (xg, w_hh, h0, b_hn), weights


def run_layer(leaves, weights, backend, dtype, with_b_hn=True, batch_sizes=None, resets=None):
    """(h_all, h_T) and the gradients of xg, w_hh, h0 (and b_hn) of sum(weights * outputs), in ``dtype``
    on DEVICE."""
    leaves = [t.detach().to(DEVICE, dtype).requires_grad_(True) for t in leaves[:4 if with_b_hn else 3]]
    b_hn = leaves[3] if with_b_hn else None
    h_all, h_T = gru_layer(*leaves[:3], b_hn, batch_sizes=batch_sizes, backend=backend,
                           resets=None if resets is None else resets.to(DEVICE))
    loss = (h_all.double() * weights[0].to(DEVICE)).sum() + (h_T.double() * weights[1].to(DEVICE)).sum()
    return (h_all, h_T), torch.autograd.grad(loss, leaves)


def check_against_reference(dtype, tol, **call):
    leaves, weights = layer_case(**call.pop("shape", {}))
    actual, actual_grads = run_layer(leaves, weights, "triton", dtype, **call)
    expected, expected_grads = run_layer(leaves, weights, "reference", torch.float64, **call)
    for name, a, e in zip(("h_all", "h_T"), actual, expected):
        assert a.dtype == dtype, f"{name} is {a.dtype}"
        assert_rel_close(a.double().cpu(), e.cpu(), tol, name)
    for name, a, e in zip(("dxg", "dw_hh", "dh0", "db_hn"), actual_grads, expected_grads):
        assert_rel_close(a.double().cpu(), e.cpu(), tol, name)


RESETS = {
    "first_step": [(0, 0), (0, 2)],
    "inside": [(1, 0), (2, 0), (3, 1)],
    "every": [(t, b) for t in range(4) for b in range(3)],
}


def resets_of(pairs, T=4, B=3):
    resets = torch.zeros(T, B, dtype=torch.bool)
    for t, b in pairs:
        resets[t, b] = True
    return resets


@pytest.mark.parametrize("variant", ["step", "persistent"])
@pytest.mark.parametrize("form", ["dense", "no_b_hn", "packed", *(f"resets_{k}" for k in RESETS), "unit_tiles"])
def test_gru_layer_matches_the_reference(form, variant, monkeypatch):
    monkeypatch.setenv("LSTM_KERNELS_TRITON_VARIANT", variant)
    call = {}
    if form == "no_b_hn":
        call["with_b_hn"] = False
    elif form == "packed":
        call["batch_sizes"] = torch.tensor([3, 3, 2, 1])
    elif form.startswith("resets_"):
        call["resets"] = resets_of(RESETS[form[len("resets_"):]])
    elif form == "unit_tiles":  # H above one tile of units (64 under the interpreter, 32 on a GPU), masked edge
        call["shape"] = dict(T=3, B=2, H=72)
    check_against_reference(torch.float32, TOL, **call)
    ran = "step_budget" if variant == "persistent" else "step"
    assert kernels.LAST_KERNELS == {"forward": ran, "backward": ran}, kernels.LAST_KERNELS


@pytest.mark.parametrize("variant", ["step", "persistent"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gru_layer_in_16_bit_within_the_tolerance(dtype, variant, monkeypatch):
    """In 16 bits; the persistent backward exchanges [d_r, d_z, d_hn] in the input dtype (one more rounding
    than the per-step kernels' fp32 exchange), still within the tolerance against float64."""
    monkeypatch.setenv("LSTM_KERNELS_TRITON_VARIANT", variant)
    check_against_reference(dtype, REL_TOL[dtype], batch_sizes=torch.tensor([3, 3, 2, 2, 1, 1]),
                            shape=dict(T=6, B=3, H=20))
    ran = "step_budget" if variant == "persistent" else "step"
    assert kernels.LAST_KERNELS == {"forward": ran, "backward": ran}, kernels.LAST_KERNELS


@pytest.mark.parametrize("with_resets", [False, True], ids=["", "resets"])
def test_persistent_gru_with_forced_tiles(with_resets):
    """The persistent kernels' GRU instances with two batch tiles of 16 rows, against the reference: the
    forward in three unit blocks of 16 (the last masked), h_all and h_T; the backward on its
    workspace (r, z, n and hn) in five unit blocks of 8, dG, dh0 and d_hn."""
    from lstm_kernels.backends.triton import persistent

    T, B, H = 3, 20, 40
    gen = torch.Generator().manual_seed(3)
    xg, w_hh = torch.randn(T, B, 3 * H, generator=gen) * 0.7, torch.randn(3 * H, H, generator=gen) / H ** 0.5
    h0, b_hn = torch.randn(B, H, generator=gen) * 0.5, torch.randn(H, generator=gen) * 0.3
    resets = (torch.rand(T, B, generator=gen) < 0.3) if with_resets else None
    xg, w_hh, h0, b_hn = (t.to(DEVICE) for t in (xg, w_hh, h0, b_hn))
    resets = None if resets is None else resets.to(DEVICE)
    cfg = persistent.forward_plan(B, H, H, torch.float32, xg.device, False, block_b=16, cell="gru")
    assert cfg["BLOCK_H"] == 16 and cfg["programs"] == 2 * 3, cfg
    h_all, h_T, c_T, ws = persistent.persistent_forward(xg, w_hh, h0, None, cfg=cfg, resets=resets, cell="gru",
                                                        b_hn=b_hn)
    assert c_T is None
    reference = get_backend("reference")
    inputs64 = [t.double() for t in (xg, w_hh, h0, b_hn)]
    e_all, e_T, _, _ = reference.forward(*inputs64[:3], None, None, None, False, resets=resets, cell="gru",
                                         b_hn=inputs64[3])
    assert_rel_close(h_all.double(), e_all, TOL, "h_all")
    assert_rel_close(h_T.double(), e_T, TOL, "h_T")
    dh_all, dh_T = torch.randn(T, B, H, generator=gen).to(DEVICE), torch.randn(B, H, generator=gen).to(DEVICE)
    bw_cfg = persistent.backward_plan(B, H, H, torch.float32, xg.device, False, units=8, block_b=16, cell="gru")
    assert bw_cfg["programs"] == 2 * 5, bw_cfg
    dG, dh0, dc0, d_hn = persistent.persistent_backward(xg, w_hh, None, None, ws, dh_all, dh_T, None, cfg=bw_cfg,
                                                        resets=resets, cell="gru", h0=h0, h_all=h_all)
    assert dc0 is None
    e_dG, e_dh0, _, e_d_hn = reference.backward(RecurrenceInputs(*inputs64[:3], None, None, None), e_all, (),
                                                dh_all.double(), dh_T.double(), None, resets=resets, cell="gru",
                                                b_hn=inputs64[3])
    for name, a, e in (("dG", dG, e_dG), ("dh0", dh0, e_dh0), ("d_hn", d_hn, e_d_hn)):
        assert_rel_close(a.double(), e, TOL, name)


@pytest.mark.skipif(DEVICE != "cpu", reason="module parity on the CPU under the interpreter; test_triton_gpu on a GPU")
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx_none", "hx"])
@pytest.mark.parametrize("input_name", ["dense", "T1", "unbatched", "packed_unsorted", "packed_sorted"])
@pytest.mark.parametrize("config_name", ["plain", "no_bias", "two_layers", "bidir", "everything"])
def test_fused_gru_on_triton_matches_nn_gru(config_name, input_name, with_hx):
    import test_gru  # tests/ is on sys.path (conftest); imported as a module so pytest does not collect it here

    assert set(test_gru.INPUTS) >= {input_name} and set(test_gru.CONFIGS) >= {config_name}
    test_gru.test_matches_nn_gru(config_name, input_name, with_hx, torch.float32, "triton")
