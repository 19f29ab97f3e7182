"""FusedLSTM against nn.LSTM (float64) on every input form nn.LSTM accepts.

Outputs, h_n, c_n and the gradients of the input, h0, c0 and every parameter.
The backends under test come from LSTM_KERNELS_TEST_BACKENDS (comma-separated,
default "reference,auto"; auto on the CPU is torch's own kernel, see
lstm_kernels/backends/native.py); CI also runs this file for "triton" under
TRITON_INTERPRET=1. A case a backend declines is skipped with its reason.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lstm_kernels import BackendUnsupportedError, FusedLSTM
from utils import REL_TOL, assert_rel_close

BACKENDS = os.environ.get("LSTM_KERNELS_TEST_BACKENDS", "reference,auto").split(",")
INPUT, HIDDEN, PROJ = 5, 6, 3

CONFIGS = {
    "plain": dict(),
    "no_bias": dict(bias=False),
    "batch_first": dict(batch_first=True),
    "two_layers": dict(num_layers=2),
    "three_layers_bidir": dict(num_layers=3, bidirectional=True),
    "bidir": dict(bidirectional=True),
    "proj": dict(proj_size=PROJ),
    "proj_bidir_2l": dict(proj_size=PROJ, num_layers=2, bidirectional=True),
    "everything": dict(proj_size=PROJ, num_layers=2, bidirectional=True, batch_first=True, bias=False),
}

# (T, B, kind): kind is "dense", "unbatched", or "packed" (unsorted lengths)
INPUTS = {
    "dense": (4, 3, "dense"),
    "T1": (1, 3, "dense"),
    "B1": (4, 1, "dense"),
    "unbatched": (4, 1, "unbatched"),
    "packed_unsorted": (5, 4, "packed"),
    "packed_sorted": (5, 3, "packed_sorted"),
}
PACKED_LENGTHS = {"packed": [3, 5, 1, 4], "packed_sorted": [5, 4, 2]}


def _make_input(config: dict, T: int, B: int, kind: str, dtype, gen: torch.Generator):
    """The input to both modules: a tensor or a PackedSequence (shared leaf ``x`` for gradients)."""
    batch_first = config.get("batch_first", False)
    if kind == "unbatched":
        x = torch.randn(T, INPUT, dtype=dtype, generator=gen)
    else:
        shape = (B, T, INPUT) if batch_first else (T, B, INPUT)
        x = torch.randn(shape, dtype=dtype, generator=gen)
    x.requires_grad_(True)
    return x


def _as_module_input(x, kind: str, config: dict):
    if not kind.startswith("packed"):
        return x
    return pack_padded_sequence(
        x, PACKED_LENGTHS[kind], batch_first=config.get("batch_first", False), enforce_sorted=kind == "packed_sorted"
    )


def _make_state(config: dict, B: int, kind: str, dtype, gen):
    D = 2 if config.get("bidirectional") else 1
    L = config.get("num_layers", 1) * D
    P = config.get("proj_size", 0) or HIDDEN
    h_shape, c_shape = ((L, P), (L, HIDDEN)) if kind == "unbatched" else ((L, B, P), (L, B, HIDDEN))
    h0 = torch.randn(h_shape, dtype=dtype, generator=gen).requires_grad_(True)
    c0 = torch.randn(c_shape, dtype=dtype, generator=gen).requires_grad_(True)
    return h0, c0


def _run(module, x, kind, config, hx):
    out, (h_n, c_n) = module(_as_module_input(x, kind, config), hx)
    out_tensor = out.data if isinstance(out, PackedSequence) else out
    # A fixed random weighting of every output, so each element's gradient matters.
    gen = torch.Generator().manual_seed(1)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in (out_tensor, h_n, c_n))
    leaves = [x, *(hx or ()), *module.parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=False)
    return (out_tensor, h_n, c_n), grads, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx_none", "hx"])
@pytest.mark.parametrize("input_name", list(INPUTS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_matches_nn_lstm(config_name, input_name, with_hx, dtype, backend):
    config = CONFIGS[config_name]
    T, B, kind = INPUTS[input_name]
    if kind.startswith("packed"):
        B = len(PACKED_LENGTHS[kind])
    torch.manual_seed(0)
    expected_module = nn.LSTM(INPUT, HIDDEN, **config, dtype=torch.float64)
    fused = FusedLSTM.from_torch(expected_module, backend=backend).to(dtype)

    gen = torch.Generator().manual_seed(2)
    x = _make_input(config, T, B, kind, torch.float64, gen)
    hx = _make_state(config, B, kind, torch.float64, gen) if with_hx else None
    x_low = x.detach().to(dtype).requires_grad_(True)
    hx_low = None if hx is None else tuple(s.detach().to(dtype).requires_grad_(True) for s in hx)

    try:
        actual, actual_grads, actual_out = _run(fused, x_low, kind, config, hx_low)
    except BackendUnsupportedError as e:
        pytest.skip(str(e))
    expected, expected_grads, expected_out = _run(expected_module, x, kind, config, hx)

    tol = REL_TOL[dtype]
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        assert_rel_close(a, e, tol, name)
    if isinstance(expected_out, PackedSequence):
        assert torch.equal(actual_out.batch_sizes, expected_out.batch_sizes)
        for field in ("sorted_indices", "unsorted_indices"):
            a, e = getattr(actual_out, field), getattr(expected_out, field)
            assert (a is None and e is None) or torch.equal(a, e), field
    names = ["input", *(["h0", "c0"] if hx else []), *(n for n, _ in fused.named_parameters())]
    for name, a, e in zip(names, actual_grads, expected_grads):
        assert_rel_close(a, e, tol, f"grad {name}")


GPU_CONFIGS = ["plain", "bidir", "proj", "everything"]
GPU_INPUTS = ["dense", "packed_unsorted", "unbatched"]
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype_name", list(GPU_DTYPES))
@pytest.mark.parametrize("input_name", GPU_INPUTS)
@pytest.mark.parametrize("config_name", GPU_CONFIGS)
def test_gpu_backend_matches_nn_lstm(config_name, input_name, dtype_name, backend):
    """FusedLSTM(backend="cuda" / "triton") on a GPU through the module's cases (packed, bidirectional,
    projections), against nn.LSTM in float64 on the same rounded weights and inputs."""
    from lstm_kernels.backends import get_backend

    import lstm_kernels

    if backend not in lstm_kernels.available_backends():
        pytest.skip(lstm_kernels.unavailable_backends().get(backend, "unavailable"))
    config, dtype = CONFIGS[config_name], GPU_DTYPES[dtype_name]
    T, B, kind = INPUTS[input_name]
    if kind.startswith("packed"):
        B = len(PACKED_LENGTHS[kind])
    torch.manual_seed(0)
    fused = FusedLSTM(INPUT, HIDDEN, **config, backend=backend, device="cuda", dtype=dtype)
    expected_module = fused.to_torch().double()  # the same (rounded) weights in float64
    gen = torch.Generator().manual_seed(2)
    x64 = _make_input(config, T, B, kind, torch.float64, gen).detach().to(dtype).double().cuda().requires_grad_(True)
    hx64 = tuple(s.detach().to(dtype).double().cuda().requires_grad_(True) for s in _make_state(config, B, kind,
                                                                                                  torch.float64, gen))
    x = x64.detach().to(dtype).requires_grad_(True)
    hx = tuple(s.detach().to(dtype).requires_grad_(True) for s in hx64)
    impl = get_backend(backend)
    try:
        actual, actual_grads, _ = _run(fused, x, kind, config, hx)
    except BackendUnsupportedError as e:
        pytest.skip(str(e))
    assert impl.last_forward_kernel is not None and impl.last_backward_kernel is not None
    expected, expected_grads, _ = _run(expected_module, x64, kind, config, hx64)
    tol = REL_TOL[dtype]
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert a.dtype == dtype and a.is_cuda, name
        assert_rel_close(a, e, tol, f"{backend} {name}")
    names = ["input", "h0", "c0", *(n for n, _ in fused.named_parameters())]
    for name, a, e in zip(names, actual_grads, expected_grads):
        assert_rel_close(a, e, tol, f"{backend} grad {name}")
