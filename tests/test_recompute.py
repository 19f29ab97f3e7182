"""Recompute mode (lstm_kernels/recompute.py): FusedLSTM(recompute=True or k) against the normal mode.

Outputs and every gradient bitwise equal to ``recompute=False`` on the same backend (dW_hr with a
projection and more than one segment: within the tolerance, the one stated exception), and within
tolerance of nn.LSTM; the memory kept for the backward, measured with saved_tensors_hooks; the
16-bit rule, double backward, no_grad, empty batches, torch.compile and bad arguments.

Backends: the reference, and ``keeping`` below, a reference that keeps a workspace as the kernel
backends do (so that there is workspace memory for recompute mode to save). The Triton backend
runs the same checks in tests/triton/test_recompute_triton.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lstm_kernels import BackendUnsupportedError, FusedLSTM, lstm_layer
from lstm_kernels.backends import _REGISTRY, Backend, get_backend, register
from lstm_kernels.backends.reference import _LSTMCell, _recurrence, compute_dtype
from lstm_kernels.recompute import check_recompute, recompute_layer, segment_bounds, segment_length
from utils import REL_TOL, assert_rel_close

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.memory import module_saved_bytes, saved_tensor_bytes  # noqa: E402

INPUT, HIDDEN, PROJ = 5, 6, 3
T = 7

CONFIGS = {
    "plain": dict(),
    "batch_first": dict(batch_first=True),
    "two_layers": dict(num_layers=2),
    "bidir": dict(bidirectional=True),
    "proj": dict(proj_size=PROJ),
    "proj_bidir_2l": dict(proj_size=PROJ, num_layers=2, bidirectional=True),
    "dropout_3l": dict(num_layers=3, dropout=0.5),
}
#: kind -> batch (or the lengths of a packed batch; sorted or not)
INPUTS = {
    "dense": 3,
    "unbatched": 1,
    "packed_unsorted": [5, 7, 2, 6],
    "packed_sorted": [7, 4, 2],
}
#: True (ceil(sqrt(T)) = 3 here), 1, a k that does not divide T, k = T, k > T
SEGMENTS = [True, 1, 2, T, 50]


class KeepingBackend(Backend):
    """The reference's numerics with a workspace like the kernel backends' (activated gates [T, B, 4H] and
    cell states [T, B, H] in the compute dtype), checked by its backward; backward not differentiable."""

    name = "keeping"

    def supports(self, call):
        return None if call.dtype.is_floating_point else "not a float"

    def workspace_spec(self, call):
        if not call.needs_grad:
            return ()
        T_, B, H = call.seq_len, call.batch, call.hidden_size
        acc = compute_dtype(call.dtype)
        return (((T_, B, 4 * H), acc), ((T_, B, H), acc))

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad):
        if not needs_grad:
            return get_backend("reference").forward(xg, w_hh, h0, c0, w_hr, batch_sizes, False)
        acc = compute_dtype(xg.dtype)
        h_all, h_T, (c_T,), acts = _recurrence(_LSTMCell(w_hh, w_hr, xg.dtype, acc), xg, h0, (c0.to(acc),),
                                               batch_sizes, keep_activations=True)
        T_, B, four_h = xg.shape
        gates = xg.new_zeros((T_, B, four_h), dtype=c_T.dtype)
        cells = xg.new_zeros((T_, B, four_h // 4), dtype=c_T.dtype)
        for t, (i, f, g, o, _, tanh_c, _) in enumerate(acts):
            gates[t, : i.shape[0]] = torch.cat([i, f, g, o], dim=1)
            cells[t, : i.shape[0]] = tanh_c
        return h_all, h_T, c_T.to(c0.dtype), (gates, cells)

    def backward(self, inputs, h_all, workspace, dh_all, dh_T, dc_T):
        call = inputs.call(True)
        assert [(tuple(w.shape), w.dtype) for w in workspace] == list(self.workspace_spec(call))
        return get_backend("reference").backward(inputs, h_all, (), dh_all, dh_T, dc_T)


@pytest.fixture(scope="module")
def keeping():
    register(KeepingBackend())
    yield "keeping"
    _REGISTRY.pop("keeping", None)


# ---- helpers ---------------------------------------------------------------------------------------


def _module_input(kind: str, config: dict, dtype, gen):
    """(leaf x, what the module gets (or a function that packs it anew for each run), batch size)."""
    batch_first = config.get("batch_first", False)
    spec = INPUTS[kind]
    if kind == "unbatched":
        x = torch.randn(T, INPUT, dtype=dtype, generator=gen).requires_grad_(True)
        return x, x, 1
    B = spec if isinstance(spec, int) else len(spec)
    x = torch.randn((B, T, INPUT) if batch_first else (T, B, INPUT), dtype=dtype, generator=gen).requires_grad_(True)
    if kind == "dense":
        return x, x, B
    return x, lambda: pack_padded_sequence(x, spec, batch_first=batch_first, enforce_sorted=kind == "packed_sorted"), B


def _state(config: dict, B: int, kind: str, dtype, gen):
    L = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    P = config.get("proj_size", 0) or HIDDEN
    lead = (L,) if kind == "unbatched" else (L, B)
    h0 = torch.randn(*lead, P, dtype=dtype, generator=gen).requires_grad_(True)
    c0 = torch.randn(*lead, HIDDEN, dtype=dtype, generator=gen).requires_grad_(True)
    return h0, c0


def _results(module, x, module_input, hx, seed: int = 0) -> dict:
    """Outputs and the gradients of x, h0, c0 and every parameter, under a weighted loss."""
    module.zero_grad(set_to_none=True)
    leaves = [x] + ([] if hx is None else list(hx))
    for t in leaves:
        t.grad = None
    torch.manual_seed(seed)  # the dropout masks
    out, (h_n, c_n) = module(module_input() if callable(module_input) else module_input, hx)
    out = out.data if isinstance(out, PackedSequence) else out
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in (out, h_n, c_n)]
    loss = sum((t.to(torch.float64) * w.to(torch.float64)).sum() for t, w in zip((out, h_n, c_n), weights))
    loss.backward()
    results = {"output": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach(), "dx": x.grad}
    if hx is not None:
        results["dh0"], results["dc0"] = hx[0].grad, hx[1].grad
    results.update({f"d{name.removeprefix('_orig_mod.')}": p.grad for name, p in module.named_parameters()})
    return results


def _pair(config: dict, backend: str, segment, dtype=torch.float64, train: bool = True):
    torch.manual_seed(0)
    lstm = nn.LSTM(INPUT, HIDDEN, **config).to(dtype)
    normal = FusedLSTM.from_torch(lstm, backend=backend)
    recompute = FusedLSTM(INPUT, HIDDEN, **config, backend=backend, dtype=dtype, recompute=segment)
    recompute.load_state_dict(lstm.state_dict())
    for m in (lstm, normal, recompute):
        m.train(train)
    return lstm, normal, recompute


def _segments(kind: str, segment) -> int:
    return len(segment_bounds(T, segment_length(T, segment)))


def _assert_same_as_normal(actual: dict, expected: dict, segments: int, dtype) -> None:
    """Bitwise, except dW_hr with more than one segment (a float sum in another order): within tolerance."""
    assert actual.keys() == expected.keys()
    for name in expected:
        if name.startswith("dweight_hr") and segments > 1:
            assert_rel_close(actual[name], expected[name], REL_TOL[dtype], name)
        else:
            assert torch.equal(actual[name], expected[name]), f"{name} differs from the normal mode"


# ---- bitwise against the normal mode ---------------------------------------------------------------


@pytest.mark.parametrize("with_hx", [False, True], ids=["zero_state", "hx"])
@pytest.mark.parametrize("segment", SEGMENTS, ids=[f"k={s}" for s in SEGMENTS])
@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_bitwise_equal_to_normal_mode_float64(config_name, kind, segment, with_hx):
    config = CONFIGS[config_name]
    _, normal, recompute = _pair(config, "reference", segment)
    gen = torch.Generator().manual_seed(2)
    x, module_input, B = _module_input(kind, config, torch.float64, gen)
    hx = _state(config, B, kind, torch.float64, gen) if with_hx else None
    expected = _results(normal, x, module_input, hx)
    actual = _results(recompute, x, module_input, hx)
    _assert_same_as_normal(actual, expected, _segments(kind, segment), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["dense", "packed_unsorted"])
@pytest.mark.parametrize("config_name", ["plain", "proj_bidir_2l", "dropout_3l"])
def test_bitwise_equal_to_normal_mode_other_dtypes(config_name, kind, dtype):
    """16-bit: the checkpoints and carried gradients stay in fp32 (the reference takes states so)."""
    config = CONFIGS[config_name]
    _, normal, recompute = _pair(config, "reference", 3, dtype)
    gen = torch.Generator().manual_seed(3)
    x, module_input, B = _module_input(kind, config, dtype, gen)
    hx = _state(config, B, kind, dtype, gen)
    _assert_same_as_normal(_results(recompute, x, module_input, hx), _results(normal, x, module_input, hx),
                           _segments(kind, 3), dtype)


@pytest.mark.parametrize("segment", [True, 1, 5])
@pytest.mark.parametrize("kind", ["dense", "packed_unsorted", "packed_sorted"])
@pytest.mark.parametrize("config_name", ["plain", "proj_bidir_2l"])
def test_bitwise_on_a_backend_with_a_workspace(keeping, config_name, kind, segment):
    config = CONFIGS[config_name]
    _, normal, recompute = _pair(config, keeping, segment)
    gen = torch.Generator().manual_seed(4)
    x, module_input, B = _module_input(kind, config, torch.float64, gen)
    hx = _state(config, B, kind, torch.float64, gen)
    _assert_same_as_normal(_results(recompute, x, module_input, hx), _results(normal, x, module_input, hx),
                           _segments(kind, segment), torch.float64)


def test_the_layer_function_matches_lstm_layer():
    """recompute_layer alone: lstm_layer's results and gradients, for every segment length 1..T+1."""
    gen = torch.Generator().manual_seed(5)
    B, H = 3, 4
    for k in range(1, T + 2):
        args = [torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_(True)
                for shape in ((T, B, 4 * H), (4 * H, H), (B, H), (B, H))]
        expected = lstm_layer(*args)
        grads_expected = torch.autograd.grad(sum(t.sum() for t in expected), args)
        actual = recompute_layer(*args, segment=k)
        grads_actual = torch.autograd.grad(sum(t.sum() for t in actual), args)
        for a, e in zip((*actual, *grads_actual), (*expected, *grads_expected)):
            assert torch.equal(a, e), k


# ---- against nn.LSTM -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("config_name", [c for c in CONFIGS if c != "dropout_3l"])
def test_matches_nn_lstm(config_name, kind):
    config = CONFIGS[config_name]
    lstm, _, recompute = _pair(config, "reference", True)
    gen = torch.Generator().manual_seed(6)
    x, module_input, B = _module_input(kind, config, torch.float64, gen)
    hx = _state(config, B, kind, torch.float64, gen)
    expected = _results(lstm, x, module_input, hx)
    actual = _results(recompute, x, module_input, hx)
    for name in expected:
        assert_rel_close(actual[name], expected[name], REL_TOL[torch.float64], name)


# ---- memory ----------------------------------------------------------------------------------------


def _layer_saved_bytes(backend: str, segment, T_: int, B: int, H: int, packed: bool):
    """Bytes lstm_layer / recompute_layer save for backward beyond their inputs, and the inputs."""
    gen = torch.Generator().manual_seed(7)
    xg = torch.randn(T_, B, 4 * H, generator=gen, requires_grad=True)
    w_hh = torch.randn(4 * H, H, generator=gen, requires_grad=True)
    h0, c0 = torch.zeros(B, H, requires_grad=True), torch.zeros(B, H, requires_grad=True)
    batch_sizes = torch.tensor([B] * (T_ // 2) + [B - 1] * (T_ - T_ // 2)) if packed else None
    inputs = (xg, w_hh, h0, c0)
    if segment is False:
        run = lambda: lstm_layer(*inputs, None, batch_sizes, backend)  # noqa: E731
    else:
        run = lambda: recompute_layer(*inputs, None, batch_sizes, backend, segment)  # noqa: E731
    saved, _ = saved_tensor_bytes(run, exclude=inputs)
    return saved


def check_keeps_less_than_the_normal_mode(backend: str, packed: bool, T_: int = 64, B: int = 4, H: int = 8) -> None:
    """With a backend that keeps a workspace: the workspace goes, the checkpoints come, as the formula
    of lstm_kernels/recompute.py says (float32)."""
    normal = _layer_saved_bytes(backend, False, T_, B, H, packed)
    recompute = _layer_saved_bytes(backend, True, T_, B, H, packed)
    assert recompute < normal
    k = segment_length(T_, True)
    workspace = sum(torch.Size(shape).numel() * dtype.itemsize
                    for shape, dtype in get_backend(backend).workspace_spec(_call(T_, B, H, packed)))
    assert workspace > 0
    checkpoints = (len(segment_bounds(T_, k)) - 1) * B * H * 4
    assert normal - recompute == workspace - checkpoints


@pytest.mark.parametrize("packed", [False, True])
def test_recompute_keeps_less_than_the_normal_mode_at_a_long_sequence(keeping, packed):
    check_keeps_less_than_the_normal_mode(keeping, packed)


def _call(T_, B, H, packed):
    from lstm_kernels.backends import RecurrenceCall

    return RecurrenceCall(T_, B, H, H, torch.float32, torch.device("cpu"), False, packed, True)


def test_on_the_reference_recompute_keeps_the_checkpoints_more():
    """The reference keeps no workspace: recompute mode adds its checkpoints (and bounds the backward's
    transient activations to a segment instead)."""
    T_, B, H = 64, 4, 8
    normal = _layer_saved_bytes("reference", False, T_, B, H, False)
    for segment in (True, 4, 16):
        k = segment_length(T_, segment)
        recompute = _layer_saved_bytes("reference", segment, T_, B, H, False)
        assert recompute - normal == (len(segment_bounds(T_, k)) - 1) * B * H * 4


def test_module_keeps_no_more_than_nn_lstm(keeping):
    """The issue's goal, on the CPU: a FusedLSTM in recompute mode saves no more for backward than nn.LSTM."""
    torch.manual_seed(0)
    T_, B, H = 128, 4, 16
    lstm = nn.LSTM(H, H, num_layers=2, bidirectional=True)
    x = torch.randn(T_, B, H, requires_grad=True)
    normal = FusedLSTM.from_torch(lstm, backend=keeping)
    recompute = FusedLSTM.from_torch(lstm, backend=keeping)
    recompute.recompute = True
    saved = {name: module_saved_bytes(m, x) for name, m in (("nn", lstm), ("normal", normal), ("recompute", recompute))}
    assert saved["recompute"] < saved["normal"]
    assert saved["recompute"] <= saved["nn"], saved


# ---- the 16-bit rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_on_a_backend_without_full_precision_states_raises(keeping, dtype):
    gen = torch.Generator().manual_seed(8)
    B, H = 2, 4
    args = [torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)
            for shape in ((T, B, 4 * H), (4 * H, H), (B, H), (B, H))]
    with pytest.raises(BackendUnsupportedError, match="keeping.*float32"):
        recompute_layer(*args, backend=keeping, segment=3)
    # one segment has no checkpoint: served, and equal to the normal mode
    expected = lstm_layer(*args, backend=keeping)
    actual = recompute_layer(*args, backend=keeping, segment=T)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    # float32 is served with any segment length
    args32 = [a.detach().float().requires_grad_(True) for a in args]
    for a, e in zip(recompute_layer(*args32, backend=keeping, segment=3), lstm_layer(*args32, backend=keeping)):
        assert torch.equal(a, e)


# ---- other paths -----------------------------------------------------------------------------------


def test_no_grad_runs_the_normal_forward():
    _, normal, recompute = _pair(CONFIGS["two_layers"], "reference", 2)
    x = torch.randn(T, 3, INPUT, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        out, (h, c) = recompute(x)
        expected = normal(x)
    assert out.grad_fn is None
    for a, e in zip((out, h, c), (expected[0], *expected[1])):
        assert torch.equal(a, e)
    # inputs and parameters that need no grad: no node either
    recompute.requires_grad_(False)
    out, _ = recompute(x.detach())
    assert out.grad_fn is None and torch.equal(out, expected[0])


@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True, proj_size=2)])
def test_empty_batch(config):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, **config)
    fused = FusedLSTM.from_torch(lstm, backend="reference")
    fused.recompute = True
    x = torch.randn(5, 0, 3, requires_grad=True)
    results = []
    for model in (lstm, fused):
        x.grad = None
        out, (h, c) = model(x)
        (out.sum() + h.sum() + c.sum()).backward()
        results.append((out.shape, h.shape, c.shape, x.grad.shape))
    assert results[0] == results[1]


@pytest.mark.parametrize("config_name", ["plain", "proj_bidir_2l"])
def test_double_backward_equals_the_normal_mode(config_name):
    config = CONFIGS[config_name]
    _, normal, recompute = _pair(config, "reference", 2)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(T, 2, INPUT, dtype=torch.float64, generator=gen, requires_grad=True)
    results = []
    for module in (normal, recompute):
        names, params = zip(("x", x), *module.named_parameters())
        out, (h, c) = module(x)
        grads = torch.autograd.grad(out.square().sum() + h.sum() + c.sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
        results.append({**{f"d{n}": g for n, g in zip(names, grads)}, **{f"dd{n}": g for n, g in zip(names, second)}})
    # The first derivatives come from the unsegmented backward (bitwise, dW_hr included); the second
    # derivative's way back through h_all runs this node's first-order, segmented backward again, so
    # the stated dW_hr exception applies to it.
    for name, expected in results[0].items():
        if name.startswith("ddweight_hr"):
            assert_rel_close(results[1][name], expected, REL_TOL[torch.float64], name)
        else:
            assert torch.equal(results[1][name], expected), name


def test_double_backward_on_a_backend_without_it_raises(keeping):
    _, _, recompute = _pair(CONFIGS["plain"], keeping, 2)
    x = torch.randn(T, 2, INPUT, dtype=torch.float64, requires_grad=True)
    out, _ = recompute(x)
    with pytest.raises(RuntimeError, match="double backward.*'keeping'"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("config_name", ["plain", "proj_bidir_2l"])
def test_compile_runs_recompute_in_one_graph(config_name):
    """fullgraph=True (no graph break); aot_eager runs the same kernels, so bitwise the eager normal mode."""
    import torch._dynamo

    config = CONFIGS[config_name]
    _, normal, recompute = _pair(config, "reference", 3)
    x = torch.randn(T, 2, INPUT, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(recompute, fullgraph=True, backend="aot_eager")
    expected = _results(normal, x, x, None)
    actual = _results(compiled, x, x, None)
    _assert_same_as_normal(actual, expected, 3, torch.float64)
    with torch.no_grad():  # the normal op, no checkpoints
        out, _ = compiled(x)
    assert torch.equal(out, expected["output"])


def test_compile_keeps_the_16_bit_rule(keeping):
    import torch._dynamo

    module = FusedLSTM(INPUT, HIDDEN, backend=keeping, recompute=2, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="keeping.*float32"):
        compiled(torch.randn(T, 2, INPUT, dtype=torch.bfloat16))


# ---- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("4", TypeError),
                                       (None, TypeError), (torch.tensor(3), TypeError)])
def test_bad_recompute_values_raise(bad, error):
    with pytest.raises(error, match="recompute"):
        FusedLSTM(INPUT, HIDDEN, recompute=bad)
    with pytest.raises(error, match="recompute"):
        check_recompute(bad)


def test_good_recompute_values():
    assert FusedLSTM(INPUT, HIDDEN, recompute=True).recompute is True
    assert FusedLSTM(INPUT, HIDDEN).recompute is False
    assert FusedLSTM(INPUT, HIDDEN, recompute=4).recompute == 4
    assert "recompute=4" in repr(FusedLSTM(INPUT, HIDDEN, recompute=4))
    assert [segment_length(n, True) for n in (1, 2, 4, 5, 9, 10, 1024)] == [1, 2, 2, 3, 3, 4, 32]
    assert segment_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError):
        recompute_layer(torch.zeros(T, 1, 4), torch.zeros(4, 1), torch.zeros(1, 1), torch.zeros(1, 1), segment=False)


# ---- resets inside a sequence ------------------------------------------------------------------------


def test_the_layer_with_resets_matches_lstm_layer():
    """recompute_layer with resets: lstm_layer's results and gradients with the same resets, for
    every segment length, resets at a segment's first step included."""
    gen = torch.Generator().manual_seed(6)
    B, H = 3, 4
    resets = torch.rand(T, B, generator=gen) < 0.3
    resets[0, 0] = resets[T - 1, 1] = True
    for k in range(1, T + 2):
        args = [torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_(True)
                for shape in ((T, B, 4 * H), (4 * H, H), (B, H), (B, H))]
        expected = lstm_layer(*args, resets=resets)
        grads_expected = torch.autograd.grad(sum(t.sum() for t in expected), args)
        actual = recompute_layer(*args, segment=k, resets=resets)
        grads_actual = torch.autograd.grad(sum(t.sum() for t in actual), args)
        for a, e in zip((*actual, *grads_actual), (*expected, *grads_expected)):
            assert torch.equal(a, e), k


@pytest.mark.parametrize("config_name", ["plain", "proj_bidir_2l"])
def test_the_module_with_resets_is_bitwise_the_normal_mode(config_name):
    config = CONFIGS[config_name]
    _, normal, recompute = _pair(config, "reference", 3)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(T, 2, INPUT, dtype=torch.float64, generator=gen)
    resets = torch.rand(T, 2, generator=gen) < 0.3

    def run(module):
        xx = x.clone().requires_grad_(True)
        out, (h, c) = module(xx, resets=resets)
        (out.square().sum() + h.sum() + c.sum()).backward()
        return [out, h, c, xx.grad, *(p.grad for p in module.parameters())]

    for a, e in zip(run(recompute), run(normal)):
        if config.get("proj_size") and a.shape == normal.weight_hr_l0.shape:
            assert_rel_close(a, e, 1e-12)  # dW_hr: a sum in another order
        else:
            assert torch.equal(a, e)


def test_compile_with_resets():
    _, normal, recompute = _pair(CONFIGS["plain"], "reference", 3)
    x = torch.randn(T, 2, INPUT, dtype=torch.float64)
    resets = torch.zeros(T, 2, dtype=torch.bool)
    resets[2, 0] = resets[3, 1] = True
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: recompute(x, resets=resets)[0], fullgraph=True, backend="aot_eager")
    xx = x.clone().requires_grad_(True)
    compiled(xx).square().sum().backward()
    xe = x.clone().requires_grad_(True)
    normal(xe, resets=resets)[0].square().sum().backward()
    assert torch.equal(xx.grad, xe.grad)
