"""The triton backend on a real GPU, at real sizes, both variants, every dtype.

Marked ``gpu``: skipped without CUDA, and skipped under TRITON_INTERPRET=1 (the
interpreter would run these sizes for hours). The rule for every dtype (the
flash-attention rule of STYLE.md): against the float64 reference on the same
rounded inputs, the relative error is at most max(REL_TOL[dtype], 2 x the error of
the reference backend itself run in that dtype).
"""
from __future__ import annotations

import os

import pytest
import torch

from lstm_kernels.backends import RecurrenceInputs, get_backend, known_backends
from utils import REL_TOL, assert_rel_close, rel_error

known_backends()
triton_backend = pytest.importorskip("lstm_kernels.backends.triton")
kernels = pytest.importorskip("lstm_kernels.backends.triton_kernels")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="real-size GPU tests; not interpreted"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ["step", "persistent"]
# (T, B, H, proj_size): long sequence; the largest batch x hidden; B = 1 with odd H; odd
# sizes; more tiles than SMs (the persistent programs loop over tiles); projections.
SHAPES = {
    "T1024_B64_H256": (1024, 64, 256, 0),
    "T512_B256_H1024": (512, 256, 1024, 0),
    "T64_B1_H1000": (64, 1, 1000, 0),
    "T128_B17_H129": (128, 17, 129, 0),
    "T16_B256_H2048": (16, 256, 2048, 0),
    "T256_B64_H512_P128": (256, 64, 512, 128),
    "T64_B256_H1024_P1536": (64, 256, 1024, 1536),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
    torch.cuda.empty_cache()


def make_case(T, B, H, proj, dtype, seed=0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    P = proj or H

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).cuda()

    batch_sizes = None
    if lengths is not None:
        lengths = torch.as_tensor(lengths)
        batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(T)], dtype=torch.int64)
    return dict(
        xg=rnd(T, B, 4 * H, scale=0.7), w_hh=rnd(4 * H, P, scale=P ** -0.5), h0=rnd(B, P, scale=0.5),
        c0=rnd(B, H), w_hr=rnd(P, H, scale=H ** -0.5) if proj else None, batch_sizes=batch_sizes,
        dh_all=rnd(T, B, P), dh_T=rnd(B, P), dc_T=rnd(B, H),
    )


def run(backend, case, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    xg, w_hh, h0, c0, w_hr = (cast(case[n]) for n in ("xg", "w_hh", "h0", "c0", "w_hr"))
    bs = case["batch_sizes"]
    h_all, h_T, c_T, ws = backend.forward(xg, w_hh, h0, c0, w_hr, bs, True)
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, w_hr, bs)
    grads_out = (cast(case["dh_all"]), cast(case["dh_T"]), cast(case["dc_T"]))
    dG, dh0, dc0, dw_hr = backend.backward(inputs, h_all, ws, *grads_out)
    torch.cuda.synchronize()
    out = dict(h_all=h_all, h_T=h_T, c_T=c_T, dG=dG, dh0=dh0, dc0=dc0)
    if w_hr is not None:
        out["dW_hr"] = dw_hr
    return out


def check(variant, case, dtype, tol_key=None):
    actual = run(triton_backend.TritonBackend(variant), case)
    expected = run(get_backend("reference"), case, torch.float64)
    own = run(get_backend("reference"), case)  # the reference's own error in this dtype
    base = REL_TOL[tol_key or dtype]
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == dtype and actual[name].is_cuda, name
        tol = max(base, 2 * rel_error(own[name], expected[name]))
        assert_rel_close(actual[name], expected[name], tol, f"{variant} {name}")
    return actual


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference_at_real_sizes(shape, dtype, variant):
    check(variant, make_case(*shape, dtype), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_variable_lengths(dtype, variant):
    T, B, H, P = 300, 64, 256, 0
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(5)).sort(descending=True).values
    lengths[0] = T
    actual = check(variant, make_case(T, B, H, P, dtype, lengths=lengths.tolist()), dtype)
    for b, n in enumerate(lengths.tolist()):
        assert (actual["h_all"][n:, b] == 0).all() and (actual["dG"][n:, b] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_tf32(variant):
    torch.backends.cuda.matmul.allow_tf32 = True
    check(variant, make_case(256, 64, 512, 0, torch.float32), torch.float32, tol_key="tf32")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_deterministic(dtype, variant):
    case = make_case(128, 96, 384, 0, dtype, seed=7)
    first = run(triton_backend.TritonBackend(variant), case)
    for _ in range(3):
        again = run(triton_backend.TritonBackend(variant), case)
        for name in first:
            assert torch.equal(first[name], again[name]), f"{name} differs between runs"


def test_auto_variant_choice():
    """auto = persistent when every tile has its own SM, step otherwise."""
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    small = kernels.launch_config(256, 64, torch.bfloat16)
    assert kernels.num_tiles(256, 64, small) <= sms
    assert kernels.choose_variant("auto", 256, 64, small, device) == "persistent"
    big = kernels.launch_config(4096, 256, torch.bfloat16)
    assert kernels.num_tiles(4096, 256, big) > sms
    assert kernels.choose_variant("auto", 4096, 256, big, device) == "step"


@pytest.mark.parametrize("proj_size", [0, 32], ids=["no_proj", "proj32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_module_on_gpu_matches_nn_lstm(variant, proj_size, monkeypatch):
    """FusedLSTM(backend="triton") end to end on CUDA: packed, bidirectional, two layers, fp32."""
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    from lstm_kernels import FusedLSTM

    monkeypatch.setenv(kernels.VARIANT_ENV, variant)
    torch.manual_seed(0)
    expected_module = nn.LSTM(
        48, 96, num_layers=2, bidirectional=True, proj_size=proj_size, dtype=torch.float64, device="cuda"
    )
    fused = FusedLSTM.from_torch(expected_module, backend="triton").float()
    lengths = [40, 33, 33, 17, 5, 1]
    x = torch.randn(40, len(lengths), 48, dtype=torch.float64, device="cuda", requires_grad=True)
    x32 = x.detach().float().requires_grad_(True)
    results = []
    for module, inp in ((fused, x32), (expected_module, x)):
        out, (h_n, c_n) = module(pack_padded_sequence(inp, lengths))
        loss = out.data.double().square().sum() + h_n.double().sum() + c_n.double().sum()
        grads = torch.autograd.grad(loss, [inp, *module.parameters()])
        results.append((out.data, h_n, c_n, *grads))
    for i, (a, e) in enumerate(zip(*results)):
        assert_rel_close(a, e, REL_TOL[torch.float32], f"result {i}")
