"""The triton backend serves resets inside a sequence: every kernel against the reference backend.

``lstm_layer(..., backend="triton", resets=...)`` against the reference backend in float64 on the
same (float32) inputs, with the same resets: the outputs h_all, h_T, c_T and every gradient (dxg,
dw_hh, dh0, dc0, and dw_hr with a projection), with the tolerances of tests/utils.py. Both kernel
sets that serve calls run: the step kernels and the persistent kernels (backends/triton/persistent*.py;
the backend runs them in their per-step mode under the interpreter, and here also with forced
tiles and as one launch over all steps). Resets at the first step, the last step, adjacent steps,
every step and none; with a projection; with packed batch sizes; several batch tiles. Last,
FusedLSTM(backend="triton") against nn.LSTM run piece by piece (tests/test_resets.py).
Tiny shapes: the interpreter is slow.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lstm_kernels import FusedLSTM, lstm_layer
from lstm_kernels.backends import get_backend, known_backends
from utils import REL_TOL, assert_rel_close

known_backends()
triton_backend = pytest.importorskip("lstm_kernels.backends.triton")
kernels = pytest.importorskip("lstm_kernels.backends.triton.config")
tp = pytest.importorskip("lstm_kernels.backends.triton.persistent")

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
#: The variants, and what each runs (LAST_KERNELS) on these small calls.
KERNELS = {"step": "step", "persistent": "step_budget"}
#: float32 runs on TF32 on a GPU (see use_kernels).
TOL = REL_TOL["tf32" if DEVICE == "cuda" else torch.float32]
T, B, H = 5, 3, 6

#: (t, b) pairs where resets is True, over T = 5 steps and B = 3 rows.
PATTERNS = {
    "none": [],
    "first": [(0, 0), (0, 2)],
    "last": [(4, 1)],
    "adjacent": [(1, 0), (2, 0), (3, 0), (2, 2), (3, 2)],
    "every": [(t, b) for t in range(T) for b in range(B)],
    "mixed": [(0, 1), (4, 1), (2, 2), (3, 2), (1, 0)],
}


def resets_of(pattern, steps=T, rows=B):
    resets = torch.zeros(steps, rows, dtype=torch.bool)
    for t, b in PATTERNS[pattern] if isinstance(pattern, str) else pattern:
        resets[t, b] = True
    return resets.to(DEVICE)


@pytest.fixture
def use_kernels(monkeypatch, set_tf32):
    """``use_kernels(variant)``: make backend "triton" run that variant; returns a check that it ran
    its kernels (KERNELS). ``use_kernels("step_budget", fw_cfg, bw_cfg, steps_mode)`` routes the
    backend's launch helpers to the persistent kernels with the given plans (or planned there) and
    ``steps_mode`` as they take it."""
    if DEVICE == "cuda":
        set_tf32(True)  # on a GPU the persistent kernels serve float32 with TF32 only (TOL)

    def use(name, fw_cfg=None, bw_cfg=None, steps_mode=None):
        if name in KERNELS:
            monkeypatch.setenv(kernels.VARIANT_ENV, name)
            backend = get_backend("triton")
            return lambda: (backend.last_forward_kernel, backend.last_backward_kernel) == (KERNELS[name],) * 2
        ran = []

        def forward(*args, variant, **kwargs):
            ran.append("forward")
            return tp.persistent_forward(*args, cfg=fw_cfg, steps_mode=steps_mode, **kwargs)

        def backward(*args, variant, **kwargs):
            ran.append("backward")
            return tp.persistent_backward(*args, cfg=bw_cfg, steps_mode=steps_mode, **kwargs)

        monkeypatch.setattr(triton_backend, "lstm_forward", forward)
        monkeypatch.setattr(triton_backend, "lstm_backward", backward)
        return lambda: ran == ["forward", "backward"]
    return use


def make_inputs(steps, rows, hidden, proj=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = proj or hidden

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    return dict(xg=rnd(steps, rows, 4 * hidden, scale=0.7), w_hh=rnd(4 * hidden, P, scale=P ** -0.5),
                h0=rnd(rows, P, scale=0.5), c0=rnd(rows, hidden), w_hr=rnd(P, hidden, scale=hidden ** -0.5) if proj else None)


def layer_outputs_and_grads(inputs, backend, resets, batch_sizes=None, dtype=torch.float32):
    """h_all, h_T, c_T and the gradients of a fixed random loss of them, by name."""
    leaves = {k: None if v is None else v.to(dtype).clone().requires_grad_(True) for k, v in inputs.items()}
    h_all, h_T, c_T = lstm_layer(leaves["xg"], leaves["w_hh"], leaves["h0"], leaves["c0"], leaves["w_hr"],
                                 batch_sizes, backend=backend, resets=resets)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE) for out in (h_all, h_T, c_T)]
    sum((out.double() * w).sum() for out, w in zip((h_all, h_T, c_T), weights)).backward()
    result = dict(h_all=h_all, h_T=h_T, c_T=c_T)
    result.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    return result


def check_layer(inputs, resets, batch_sizes=None):
    actual = layer_outputs_and_grads(inputs, "triton", resets, batch_sizes)
    expected = layer_outputs_and_grads(inputs, "reference", resets, batch_sizes, dtype=torch.float64)
    assert set(actual) == set(expected)
    for name, e in expected.items():
        assert_rel_close(actual[name], e, TOL, name)
    return actual


@pytest.mark.parametrize("proj", [0, 4], ids=["no_proj", "proj4"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_layer_matches_reference(kernel, pattern, proj, use_kernels):
    ran = use_kernels(kernel)
    check_layer(make_inputs(T, B, H, proj), resets_of(pattern))
    assert ran(), kernel


@pytest.mark.parametrize("proj", [0, 7], ids=["no_proj", "proj7"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_batch_sizes(kernel, proj, use_kernels):
    """Resets on rows of a packed batch, also where a row is no longer active (it keeps its state)."""
    lengths = [5, 4, 2, 2, 1]
    batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)], dtype=torch.int64)
    resets = resets_of([(0, 4), (1, 0), (1, 2), (2, 1), (3, 1), (3, 3), (4, 0), (4, 3)], rows=len(lengths))
    ran = use_kernels(kernel)
    actual = check_layer(make_inputs(T, len(lengths), 13, proj, seed=2), resets, batch_sizes)
    assert ran(), kernel
    for b, n in enumerate(lengths):
        assert (actual["h_all"][n:, b] == 0).all()


@pytest.mark.parametrize("proj", [0, 5], ids=["no_proj", "proj5"])
def test_step_budget_kernels_with_several_tiles(proj, use_kernels):
    """Two batch tiles and two unit blocks (the last of each partial), a projection with fewer state
    tiles than cell tiles: each program applies its own batch tile's resets."""
    rows, hidden = 17, 13
    cpu = torch.device(DEVICE)
    fw_cfg = tp.forward_plan(rows, hidden, proj or hidden, torch.float32, cpu, bool(proj), block_h=8, block_b=16)
    bw_cfg = tp.backward_plan(rows, hidden, proj or hidden, torch.float32, cpu, bool(proj), units=8, block_b=16)
    ran = use_kernels("step_budget", fw_cfg, bw_cfg)
    resets = resets_of([(0, 16), (1, 3), (2, 16), (3, 3), (3, 15), (1, 9), (2, 0)], rows=rows)
    check_layer(make_inputs(4, rows, hidden, proj, seed=3), resets[:4])
    assert ran()


@pytest.mark.parametrize("kernel", KERNELS)
def test_more_than_64_rows(kernel, use_kernels):
    """The flags of rows 64 and on are in the second word of each step (config.reset_rows),
    read by the programs of the second batch tile."""
    rows = 70
    ran = use_kernels(kernel)
    resets = resets_of([(0, 69), (1, 3), (1, 64), (2, 64), (2, 65), (1, 63)], steps=3, rows=rows)
    check_layer(make_inputs(3, rows, 5, seed=4), resets)
    assert ran()


@pytest.mark.parametrize("proj", [0, 4], ids=["no_proj", "proj4"])
@pytest.mark.parametrize("pattern", ["first", "adjacent", "mixed"])
def test_step_budget_kernels_in_one_launch(pattern, proj, use_kernels):
    """All steps in one launch, as on a GPU: the flags each program prefetches and carries from step
    to step (the per-step mode above reads them on entry only). One program (one tile), so no grid
    barrier, which the interpreter could not pass."""
    cpu = torch.device(DEVICE)
    fw_cfg = tp.forward_plan(B, H, proj or H, torch.float32, cpu, bool(proj), block_h=8)
    bw_cfg = tp.backward_plan(B, H, proj or H, torch.float32, cpu, bool(proj), units=8)
    assert fw_cfg["programs"] == bw_cfg["programs"] == 1, (fw_cfg, bw_cfg)
    ran = use_kernels("step_budget", fw_cfg, bw_cfg, steps_mode=False)
    check_layer(make_inputs(T, B, H, proj), resets_of(pattern))
    assert ran()


def test_fused_lstm_matches_nn_lstm_piece_by_piece(use_kernels):
    """FusedLSTM(backend="triton") with resets against nn.LSTM run on each piece of each row separately
    (in float64, on the same float32-rounded weights and inputs), outputs and every gradient."""
    from test_resets import B as MODULE_B, I, T as MODULE_T, _loss_and_grads, _models, _resets, _separately

    use_kernels("step")
    lstm, _ = _models(dtype=torch.float64, num_layers=2, proj_size=3)
    with torch.no_grad():
        for p in lstm.parameters():
            p.copy_(p.float().double())
    fused = FusedLSTM.from_torch(copy.deepcopy(lstm).float(), backend="triton").to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(MODULE_T, MODULE_B, I, generator=gen)
    hx = (torch.randn(2, MODULE_B, 3, generator=gen), torch.randn(2, MODULE_B, lstm.hidden_size, generator=gen))
    resets = _resets("mixed")

    def fused_run(x, hx):
        out, (h, c) = fused(x, hx, resets=resets.to(DEVICE))
        return out, h, c

    actual = _loss_and_grads(fused_run, list(fused.parameters()), x.to(DEVICE), tuple(s.to(DEVICE) for s in hx))
    expected = _loss_and_grads(lambda x, hx: _separately(lstm, x, hx, resets), list(lstm.parameters()), x.double(),
                               tuple(s.double() for s in hx))
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, TOL, f"output or gradient {i}")
