"""FusedGRU against nn.GRU, and gru_layer against float64.

Outputs, h_n and the gradients of the input, h0 and every parameter, on every input form nn.GRU
accepts; the module's face (parameters, state dicts, conversion, errors, dropout); the layer's
gradients by gradcheck and gradgradcheck; resets; dispatch of the GRU; torch.compile. Backends
under test: LSTM_KERNELS_TEST_BACKENDS (default "reference,auto"; auto on the CPU is torch's own
GRU kernel, whose results must be nn.GRU's to the bit).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lstm_kernels import BackendUnsupportedError, FusedGRU, FusedLSTM, gru_layer
from lstm_kernels.backends import RecurrenceCall, resolve_backend
from utils import REL_TOL, assert_rel_close

BACKENDS = os.environ.get("LSTM_KERNELS_TEST_BACKENDS", "reference,auto").split(",")
INPUT, HIDDEN = 5, 6

CONFIGS = {
    "plain": dict(),
    "no_bias": dict(bias=False),
    "two_layers": dict(num_layers=2),
    "bidir": dict(bidirectional=True),
    "everything": dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
}
# (T, B, kind): "dense", "unbatched", "packed" (unsorted lengths) or "packed_sorted"
INPUTS = {
    "dense": (4, 3, "dense"),
    "T1": (1, 3, "dense"),
    "unbatched": (4, 1, "unbatched"),
    "packed_unsorted": (5, 4, "packed"),
    "packed_sorted": (5, 3, "packed_sorted"),
}
PACKED_LENGTHS = {"packed": [3, 5, 1, 4], "packed_sorted": [5, 4, 2]}


def _case(config: dict, input_name: str, with_hx: bool, gen: torch.Generator):
    """float64 leaves: x (batch_first where configured) and h0 or None."""
    T, B, kind = INPUTS[input_name]
    if kind.startswith("packed"):
        B = len(PACKED_LENGTHS[kind])
    layers = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    if kind == "unbatched":
        x, h_shape = torch.randn(T, INPUT, dtype=torch.float64, generator=gen), (layers, HIDDEN)
    else:
        shape = (B, T, INPUT) if config.get("batch_first") else (T, B, INPUT)
        x, h_shape = torch.randn(shape, dtype=torch.float64, generator=gen), (layers, B, HIDDEN)
    h0 = torch.randn(h_shape, dtype=torch.float64, generator=gen) if with_hx else None
    return x, h0


def _run(module, x, h0, input_name: str, config: dict):
    """(output data, h_n), the gradients of x, h0 and every parameter of a fixed random weighting, output."""
    kind = INPUTS[input_name][2]
    given = x
    if kind.startswith("packed"):
        given = pack_padded_sequence(x, PACKED_LENGTHS[kind], batch_first=config.get("batch_first", False),
                                     enforce_sorted=kind == "packed_sorted")
    out, h_n = module(given, h0)
    data = out.data if isinstance(out, PackedSequence) else out
    gen = torch.Generator().manual_seed(1)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum() for t in (data, h_n))
    leaves = [x, *([h0] if h0 is not None else []), *module.parameters()]
    return (data, h_n), torch.autograd.grad(loss, leaves), out


def _leaves(x, h0, dtype):
    x = x.detach().to(dtype).requires_grad_(True)
    return x, None if h0 is None else h0.detach().to(dtype).requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx_none", "hx"])
@pytest.mark.parametrize("input_name", list(INPUTS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_matches_nn_gru(config_name, input_name, with_hx, dtype, backend):
    config = CONFIGS[config_name]
    torch.manual_seed(0)
    expected_module = nn.GRU(INPUT, HIDDEN, **config, dtype=torch.float64)
    fused = FusedGRU.from_torch(expected_module, backend=backend).to(dtype)
    x, h0 = _case(config, input_name, with_hx, torch.Generator().manual_seed(2))
    try:
        actual, actual_grads, actual_out = _run(fused, *_leaves(x, h0, dtype), input_name, config)
    except BackendUnsupportedError as e:
        pytest.skip(str(e))
    expected, expected_grads, expected_out = _run(expected_module, *_leaves(x, h0, torch.float64), input_name, config)
    tol = REL_TOL[dtype]
    for name, a, e in zip(("output", "h_n"), actual, expected):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        assert_rel_close(a, e, tol, name)
    if isinstance(expected_out, PackedSequence):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, e = getattr(actual_out, field), getattr(expected_out, field)
            assert (a is None and e is None) or torch.equal(a, e), field
    names = ["input", *(["h0"] if with_hx else []), *(n for n, _ in fused.named_parameters())]
    for name, a, e in zip(names, actual_grads, expected_grads):
        assert_rel_close(a, e, tol, f"grad {name}")


@pytest.mark.parametrize("config_name", ["plain", "everything"])
@pytest.mark.parametrize("input_name", ["dense", "packed_unsorted", "unbatched"])
def test_cpu_auto_is_nn_gru_to_the_bit(config_name, input_name):
    """On the CPU, auto runs torch's own GRU kernel: outputs and gradients are nn.GRU's, bitwise."""
    config = CONFIGS[config_name]
    torch.manual_seed(0)
    gru = nn.GRU(INPUT, HIDDEN, **config)
    fused = FusedGRU.from_torch(gru)
    assert fused.path_for(torch.randn(4, 3, INPUT)) == "native"
    x, h0 = _case(config, input_name, True, torch.Generator().manual_seed(3))
    actual, actual_grads, _ = _run(fused, *_leaves(x, h0, torch.float32), input_name, config)
    expected, expected_grads, _ = _run(gru, *_leaves(x, h0, torch.float32), input_name, config)
    for a, e in zip((*actual, *actual_grads), (*expected, *expected_grads)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_on_the_reference_within_the_tolerance(dtype):
    """fp32 gates and accumulation, h rounded every step: within the 16-bit tolerance of float64
    run on the same 16-bit inputs."""
    torch.manual_seed(0)
    expected_module = nn.GRU(INPUT, HIDDEN, num_layers=2, dtype=torch.float64)
    fused = FusedGRU.from_torch(expected_module, backend="reference").to(dtype)
    expected_module.load_state_dict({k: v.to(dtype).double() for k, v in fused.state_dict().items()})
    x, h0 = _case({"num_layers": 2}, "dense", True, torch.Generator().manual_seed(4))
    x, h0 = x.to(dtype).double(), h0.to(dtype).double()
    actual, actual_grads, _ = _run(fused, *_leaves(x, h0, dtype), "dense", {})
    expected, expected_grads, _ = _run(expected_module, *_leaves(x, h0, torch.float64), "dense", {})
    for a, e in zip((*actual, *actual_grads), (*expected, *expected_grads)):
        assert_rel_close(a, e, REL_TOL[dtype])


# ---- one layer ---------------------------------------------------------------------------------

def _layer_inputs(T=4, B=3, H=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xg = torch.randn(T, B, 3 * H, dtype=torch.float64, generator=gen)
    w_hh = torch.randn(3 * H, H, dtype=torch.float64, generator=gen) / H ** 0.5
    h0 = torch.randn(B, H, dtype=torch.float64, generator=gen)
    b_hn = torch.randn(H, dtype=torch.float64, generator=gen)
    return [t.requires_grad_(True) for t in (xg, w_hh, h0, b_hn)]


@pytest.mark.parametrize("form", ["dense", "packed", "resets", "no_b_hn"])
def test_gru_layer_gradcheck_and_gradgradcheck(form):
    xg, w_hh, h0, b_hn = _layer_inputs()
    batch_sizes = torch.tensor([3, 3, 2, 1]) if form == "packed" else None
    resets = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.bool) if form == "resets" else None
    inputs = (xg, w_hh, h0) if form == "no_b_hn" else (xg, w_hh, h0, b_hn)

    def layer(*args):
        return gru_layer(*args, *((None,) if len(args) == 3 else ()), batch_sizes=batch_sizes, backend="reference",
                         resets=resets)

    assert torch.autograd.gradcheck(layer, inputs)
    assert torch.autograd.gradgradcheck(layer, inputs)


def test_gru_layer_is_nn_grus_single_layer():
    """xg = x W_ihᵀ + b_ih + [b_hr, b_hz, 0] and b_hn apart: the layer is nn.GRU's one layer."""
    torch.manual_seed(0)
    gru = nn.GRU(INPUT, HIDDEN, dtype=torch.float64)
    x = torch.randn(6, 2, INPUT, dtype=torch.float64)
    h0 = torch.randn(2, HIDDEN, dtype=torch.float64)
    b_hh = gru.bias_hh_l0
    xg = nn.functional.linear(x, gru.weight_ih_l0, gru.bias_ih_l0 + torch.cat([b_hh[:2 * HIDDEN], b_hh.new_zeros(HIDDEN)]))
    h_all, h_T = gru_layer(xg, gru.weight_hh_l0, h0, b_hh[2 * HIDDEN:], backend="reference")
    expected, expected_h = gru(x, h0.unsqueeze(0))
    assert_rel_close(h_all, expected, REL_TOL[torch.float64], "h_all")
    assert_rel_close(h_T, expected_h[0], REL_TOL[torch.float64], "h_T")


@pytest.mark.parametrize("argument, shape, message", [
    ("xg", (4, 3, 13), r"xg must be \[T, B, 3\*hidden_size\]"),
    ("w_hh", (12, 3), r"w_hh must be \[3\*hidden_size, hidden_size\]"),
    ("h0", (3, 5), r"h0 must be \[3, 4\]"),
    ("b_hn", (5,), r"b_hn must be \[4\]"),
])
def test_gru_layer_names_a_wrong_shape(argument, shape, message):
    inputs = dict(zip(("xg", "w_hh", "h0", "b_hn"), _layer_inputs()))
    inputs[argument] = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        gru_layer(inputs["xg"], inputs["w_hh"], inputs["h0"], inputs["b_hn"], backend="reference")


def test_a_backend_without_the_gru_is_passed_over_or_refuses():
    """Dispatch never hands the GRU to a backend whose ``cells`` lack it: auto moves on, a named one
    raises naming the cell."""
    from lstm_kernels.backends import Backend, _REGISTRY, register

    class LSTMOnly(Backend):
        name = "lstm_only"

        def supports(self, call):
            return None

    register(LSTMOnly())
    try:
        call = RecurrenceCall(seq_len=4, batch=3, hidden_size=4, state_size=4, dtype=torch.float32,
                              device=torch.device("cpu"), has_projection=False, variable_lengths=False,
                              needs_grad=True, cell="gru")
        with pytest.raises(BackendUnsupportedError, match="does not serve the GRU cell"):
            resolve_backend("lstm_only", call)
        assert resolve_backend("auto", call).name == "reference"
    finally:
        _REGISTRY.pop("lstm_only")


# ---- the module's face -------------------------------------------------------------------------

def test_parameters_are_nn_grus():
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.5, bias=True)
    gru, fused = nn.GRU(3, 4, **kwargs), FusedGRU(3, 4, **kwargs)
    assert [(n, p.shape) for n, p in gru.named_parameters()] == [(n, p.shape) for n, p in fused.named_parameters()]
    bound = 1 / 4 ** 0.5
    assert all(p.abs().max() <= bound for p in fused.parameters())
    assert fused.state_dict().keys() == gru.state_dict().keys()
    for k, v in FusedGRU.from_torch(gru).state_dict().items():
        assert torch.equal(v, gru.state_dict()[k])
    back = fused.to_torch()
    assert isinstance(back, nn.GRU) and (back.num_layers, back.bidirectional, back.batch_first) == (2, True, True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, fused.state_dict()[k])
    assert not isinstance(fused, FusedLSTM)
    with pytest.raises(TypeError):
        FusedGRU(3, 4, proj_size=2)  # nn.GRU has no projection


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    fused = FusedGRU(3, 4, num_layers=2, dropout=1.0, backend="reference")
    x = torch.randn(5, 2, 3)
    out_train, _ = fused(x)
    fused.eval()
    out_eval, _ = fused(x)
    no_dropout = FusedGRU(3, 4, num_layers=2, backend="reference")
    no_dropout.load_state_dict(fused.state_dict())
    assert torch.equal(out_eval, no_dropout(x)[0])
    # dropout 1 zeroes layer 1's input: its output is a function of the biases alone
    b_only = FusedGRU(3, 4, num_layers=2, backend="reference")
    b_only.load_state_dict(fused.state_dict())
    with torch.no_grad():
        b_only.weight_ih_l1.zero_()
    assert torch.allclose(out_train, b_only(x)[0])


def test_deterministic_on_the_reference():
    torch.manual_seed(0)
    fused = FusedGRU(3, 4, num_layers=2, bidirectional=True, backend="reference")
    x = torch.randn(5, 2, 3, requires_grad=True)
    runs = []
    for _ in range(2):
        out, h = fused(x)
        runs.append((out, h, *torch.autograd.grad(out.square().sum() + h.sum(), [x, *fused.parameters()])))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_resets_cut_the_sequence():
    """A reset at step t: the row continues as if a new sequence started there from zeros."""
    torch.manual_seed(0)
    fused = FusedGRU(3, 4, backend="reference")
    x = torch.randn(6, 2, 3)
    h0 = torch.randn(1, 2, 4)
    resets = torch.zeros(6, 2, dtype=torch.bool)
    resets[3, 0] = True
    out, _ = fused(x, h0, resets=resets)
    first, _ = fused(x[:3, :1], h0[:, :1])
    second, _ = fused(x[3:, :1])
    assert torch.allclose(out[:, 0], torch.cat([first, second])[:, 0], atol=1e-6)
    untouched, _ = fused(x[:, 1:], h0[:, 1:])
    assert torch.allclose(out[:, 1], untouched[:, 0], atol=1e-6)


def _error(module, *args):
    try:
        module(*args)
    except Exception as e:  # noqa: BLE001  (the type is what is compared)
        return type(e), str(e)
    return None, None


BAD_CALLS = {
    "4-D input": lambda: (torch.randn(2, 3, 4, 3),),
    "wrong feature size": lambda: (torch.randn(5, 2, 7),),
    "wrong dtype": lambda: (torch.randn(5, 2, 3, dtype=torch.float64),),
    "2-D hx for batched input": lambda: (torch.randn(5, 2, 3), torch.randn(2, 4)),
    "3-D hx for unbatched input": lambda: (torch.randn(5, 3), torch.randn(1, 2, 4)),
    "wrong hx batch": lambda: (torch.randn(5, 2, 3), torch.randn(1, 3, 4)),
    "wrong hx layers": lambda: (torch.randn(5, 2, 3), torch.randn(2, 2, 4)),
    "hx as a tuple": lambda: (torch.randn(5, 2, 3), (torch.randn(1, 2, 4),)),
    "empty sequence": lambda: (torch.randn(0, 2, 3),),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_what_nn_gru_raises(case):
    torch.manual_seed(0)
    gru = nn.GRU(3, 4)
    fused = FusedGRU.from_torch(gru, backend="reference")
    expected_type, expected_message = _error(gru, *BAD_CALLS[case]())
    actual_type, actual_message = _error(fused, *BAD_CALLS[case]())
    assert expected_type is not None
    assert actual_type is expected_type, f"{actual_type}: {actual_message} (nn.GRU: {expected_message})"


def test_good_input_forms_give_nn_grus_shapes():
    gru = nn.GRU(3, 4, batch_first=True)
    fused = FusedGRU.from_torch(gru)
    for args in [(torch.randn(2, 5, 3),), (torch.randn(5, 3),), (torch.randn(5, 3), torch.randn(1, 4)),
                 (torch.randn(0, 5, 3),)]:
        (out, h), (expected, expected_h) = fused(*args), gru(*args)
        assert out.shape == expected.shape and h.shape == expected_h.shape


def test_compiled_matches_eager():
    """torch.compile with fullgraph=True: torch's GRU kernel traced on the CPU auto path, the op
    lstm_kernels::recurrence on the per-layer path (the reference), outputs and gradients."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3)
    for backend in ("auto", "reference"):
        fused = FusedGRU(3, 4, num_layers=2, backend=backend)
        torch._dynamo.reset()
        expected, expected_h = fused(x)
        expected_grads = torch.autograd.grad((expected.square().sum() + expected_h.sum()), list(fused.parameters()))
        out, h = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
        grads = torch.autograd.grad((out.square().sum() + h.sum()), list(fused.parameters()))
        assert_rel_close(out, expected, REL_TOL[torch.float32], f"{backend} output")
        assert_rel_close(h, expected_h, REL_TOL[torch.float32], f"{backend} h_n")
        for (name, _), a, e in zip(fused.named_parameters(), grads, expected_grads):
            assert_rel_close(a, e, REL_TOL[torch.float32], f"{backend} grad {name}")


def test_compiled_per_layer_path_has_one_op_per_layer_direction_and_no_break():
    fused = FusedGRU(3, 4, num_layers=2, bidirectional=True, backend="reference")
    explanation = torch._dynamo.explain(fused)(torch.randn(5, 2, 3))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    code = "\n".join(g.code for g in explanation.graphs)
    assert code.count("lstm_kernels.recurrence") == 4, code


@pytest.mark.parametrize("with_b_hn", [True, False], ids=["b_hn", "no_b_hn"])
@pytest.mark.parametrize("with_resets", [False, True], ids=["", "resets"])
def test_gru_form_of_the_ops_passes_opcheck(with_resets, with_b_hn):
    """The ops' GRU form (no c0): schema, fake implementation and autograd (torch.library.opcheck),
    and gradcheck through the op path."""
    from lstm_kernels import ops

    gen = torch.Generator().manual_seed(0)
    T, B, H = 4, 3, 5

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)

    b_hn = rand(H) if with_b_hn else None
    resets = torch.rand(T, B, generator=gen) < 0.3 if with_resets else None
    args = (rand(T, B, 3 * H), rand(3 * H, H), rand(B, H), None, None, None, "reference", True, resets, b_hn)
    torch.library.opcheck(ops.recurrence, args)
    h_all = ops.recurrence(*args)[0].detach()
    backward_args = (*(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]), h_all, [],
                     torch.randn(T, B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64), None,
                     "reference", resets, None if b_hn is None else b_hn.detach())
    torch.library.opcheck(ops.recurrence_backward, backward_args)
    leaves = [a for a in (args[0], args[1], args[2], b_hn) if a is not None]

    def op_path(xg, w_hh, h0, *bias):
        return ops.recurrence_with_grad(xg, w_hh, h0, None, None, None, "reference", resets, *bias)[:2]

    assert torch.autograd.gradcheck(op_path, leaves)
