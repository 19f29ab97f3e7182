"""``backend="auto"`` on the CPU: torch's own LSTM kernel for the whole module (lstm_kernels/backends/native.py).

The path exists so that FusedLSTM is never slower than nn.LSTM on the CPU; these
tests check when it is taken and that every promise FusedLSTM makes holds on it:
nn.LSTM's results to the bit, eval-mode backward, double backward, determinism,
and one graph under torch.compile that runs the same kernel (the op ``lstm_kernels::native_lstm``).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_kernels.recurrent_module as module_mod
from lstm_kernels.backends import native
from lstm_kernels import FusedLSTM
from lstm_kernels.backends import ENV_VAR
from lstm_kernels.backends.native import native_path_reason
from utils import assert_rel_close

CONFIG = dict(num_layers=2, bidirectional=True, proj_size=3)


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the calls that take the native path."""
    calls = []
    original = module_mod.run_native

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module_mod, "run_native", spy)
    return calls


def _loss_and_grads(model, x, hx, run=None):
    """Outputs, then the gradients of x, of hx (where given) and of every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    hx = None if hx is None else tuple(s.detach().requires_grad_(True) for s in hx)
    out, (h, c) = (run or model)(x, hx)
    (out.square().sum() + h.sum() + 2 * c.sum()).backward()
    return [out, h, c, x.grad, *(s.grad for s in hx or ()), *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("config", [dict(), CONFIG, dict(bias=False, batch_first=True)])
def test_auto_on_cpu_is_nn_lstm_to_the_bit(config, native_calls):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6, **config)
    fused = FusedLSTM.from_torch(lstm)
    shape = (3, 4, 5) if config.get("batch_first") else (4, 3, 5)
    d = 2 if config.get("bidirectional") else 1
    layers = config.get("num_layers", 1) * d
    hx = (torch.randn(layers, 3, config.get("proj_size") or 6), torch.randn(layers, 3, 6))
    x = torch.randn(shape)
    for actual, expected in zip(_loss_and_grads(fused, x, hx), _loss_and_grads(lstm, x, hx)):
        assert torch.equal(actual, expected)
    assert native_calls


def test_auto_on_cpu_packed_is_nn_lstm_to_the_bit(native_calls):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6, **CONFIG)
    fused = FusedLSTM.from_torch(lstm)
    packed = pack_padded_sequence(torch.randn(6, 4, 5), torch.tensor([3, 6, 1, 4]), enforce_sorted=False)
    (out, (h, c)), (out_e, (h_e, c_e)) = fused(packed), lstm(packed)
    assert torch.equal(out.data, out_e.data) and torch.equal(out.batch_sizes, out_e.batch_sizes)
    assert torch.equal(out.unsorted_indices, out_e.unsorted_indices)
    assert torch.equal(h, h_e) and torch.equal(c, c_e)
    assert native_calls


def test_named_backend_and_env_var_take_the_per_layer_path(native_calls, monkeypatch):
    x = torch.randn(3, 2, 5)
    FusedLSTM(5, 6, backend="reference")(x)
    monkeypatch.setenv(ENV_VAR, "reference")
    FusedLSTM(5, 6)(x)
    assert not native_calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_cpu_inputs_take_the_per_layer_path(dtype, native_calls):
    FusedLSTM(5, 6, dtype=dtype)(torch.randn(3, 2, 5, dtype=dtype))
    assert not native_calls


def test_reasons():
    x = torch.randn(2, 1, 3)
    assert native_path_reason("auto", x) is None
    assert native_path_reason("auto", x.double()) is None
    assert "named" in native_path_reason("reference", x)
    assert "dtype" in native_path_reason("auto", x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in native_path_reason("auto", x)
    meta = torch.empty(2, 1, 3, device="meta")
    assert "meta" in native_path_reason("auto", meta)


def test_eval_mode_backward(native_calls):
    torch.manual_seed(0)
    fused = FusedLSTM(5, 6, num_layers=2, dropout=0.5).eval()
    x = torch.randn(4, 2, 5, requires_grad=True)
    fused(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert native_calls


def test_dropout_in_training_uses_nn_lstm_mask():
    """Dropout between layers: with the same seed, the same mask as nn.LSTM's (the same op draws it)."""
    lstm = nn.LSTM(5, 6, num_layers=3, dropout=0.5)
    fused = FusedLSTM.from_torch(lstm)
    x = torch.randn(4, 2, 5)
    torch.manual_seed(1)
    expected = lstm(x)[0]
    torch.manual_seed(1)
    assert torch.equal(fused(x)[0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_matches_reference(dtype, native_calls):
    torch.manual_seed(0)
    fused = FusedLSTM(4, 5, dtype=dtype, **CONFIG)
    reference = FusedLSTM.from_torch(fused.to_torch(), backend="reference")
    x = torch.randn(5, 2, 4, dtype=dtype)

    def second_order(model):
        xi = x.clone().requires_grad_(True)
        out = model(xi)[0]
        (g,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), xi)
        return g, gg

    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for actual, expected in zip(second_order(fused), second_order(reference)):
        assert_rel_close(actual, expected, tol)
    assert native_calls


def test_gradgradcheck_float64():
    fused = FusedLSTM(3, 4, proj_size=2, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: fused(x)[0], (x,))


def test_bitwise_deterministic_under_deterministic_algorithms():
    torch.manual_seed(0)
    fused = FusedLSTM(5, 6, **CONFIG)
    x = torch.randn(6, 3, 5)
    hx = (torch.zeros(4, 3, 3), torch.zeros(4, 3, 6))
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _loss_and_grads(fused, x, hx), _loss_and_grads(fused, x, hx)
    finally:
        torch.use_deterministic_algorithms(old)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _graph_code(model, *args) -> str:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    return "\n".join(g.code for g in explanation.graphs)


def test_compile_runs_the_native_kernel_as_one_op():
    """Under torch.compile the whole module is one lstm_kernels::native_lstm node, the kernel eager runs."""
    code = _graph_code(FusedLSTM(4, 6, **CONFIG), torch.randn(5, 2, 4))
    assert code.count("lstm_kernels.native_lstm") == 1 and "lstm_kernels.recurrence" not in code, code


def test_compile_with_active_dropout_takes_the_per_layer_path():
    fused = FusedLSTM(4, 6, num_layers=2, dropout=0.5)
    code = _graph_code(fused, torch.randn(5, 2, 4))
    assert "native_lstm" not in code and code.count("lstm_kernels.recurrence") == 2, code
    fused.eval()
    assert _graph_code(fused, torch.randn(5, 2, 4)).count("lstm_kernels.native_lstm") == 1


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_native_path_is_nn_lstm(packed, compiler):
    """Outputs and every gradient of the compiled module equal eager nn.LSTM's (the same kernel)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6, **CONFIG)
    fused = FusedLSTM.from_torch(lstm)
    # Initial states with packed input do not trace (its batch size is data-dependent): zeros there.
    hx = None if packed else (torch.randn(4, 3, 3), torch.randn(4, 3, 6))
    x = torch.randn(4, 3, 5)

    def run(model, x, hx):
        if not packed:
            return model(x, hx)
        out, state = model(pack_padded_sequence(x, [4, 2, 3], enforce_sorted=False), hx)
        return out.data, state

    torch._dynamo.reset()
    compiled_fused = torch.compile(fused, fullgraph=True, backend=compiler)  # packing stays outside the graph
    compiled = lambda x, hx: run(compiled_fused, x, hx)  # noqa: E731
    actual = _loss_and_grads(fused, x, hx, run=compiled)
    expected = _loss_and_grads(lstm, x, hx, run=lambda x, hx: run(lstm, x, hx))
    assert len(actual) == (4 if packed else 6) + len(list(lstm.parameters()))
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert_rel_close(a, e, 1e-5, f"result {k}")


def test_native_ops_pass_torch_library_opcheck():
    from lstm_kernels.backends import native

    torch.manual_seed(0)
    fused = FusedLSTM(3, 4, num_layers=2, bidirectional=True).double()
    weights = [w.detach().requires_grad_(True) for w in fused._flat_weights]
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    config = (True, 2, 0.0, True, True)
    torch.library.opcheck(native.native_lstm, (x, h0, c0, weights, None, *config))
    grads = (torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(4, 2, 4, dtype=torch.float64),
             torch.randn(4, 2, 4, dtype=torch.float64))
    detached = [t.detach() for t in (x, h0, c0)]
    torch.library.opcheck(native.native_lstm_backward, (*detached, [w.detach() for w in weights], None, *config, *grads))
    assert torch.autograd.gradcheck(
        lambda x, h0, c0, *w: native.native_lstm(x, h0, c0, list(w), None, *config), (x, h0, c0, *weights)
    )


def test_path_for_names_what_forward_runs(native_calls, monkeypatch):
    x = torch.randn(3, 2, 5)
    assert FusedLSTM(5, 6).path_for(x) == "native"
    assert FusedLSTM(5, 6, backend="reference").path_for(x) == "reference"
    assert FusedLSTM(5, 6, dtype=torch.bfloat16).path_for(x.bfloat16()) == "reference"
    packed = pack_padded_sequence(torch.randn(4, 2, 5), torch.tensor([4, 2]))
    assert FusedLSTM(5, 6, bidirectional=True).path_for(packed) == "native"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert FusedLSTM(5, 6).path_for(x) == "reference"
    assert not native_calls  # path_for runs nothing


def test_backend_from_env_reads_the_variable_on_every_call(monkeypatch):
    from lstm_kernels.backends import backend_from_env

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert backend_from_env() == "auto" and backend_from_env("cuda") == "cuda"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert backend_from_env() == "reference"
    monkeypatch.setenv(ENV_VAR, "")
    assert backend_from_env() == "auto"


def test_reparametrized_weights_like_nn_lstm(native_calls):
    """weight_norm moves a weight out of _parameters (computed on access): the native path must see it."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6)
    fused = FusedLSTM.from_torch(lstm)
    for module in (lstm, fused):
        torch.nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
        torch.nn.utils.parametrizations.weight_norm(module, "weight_ih_l0")
    x = torch.randn(5, 2, 4)
    (out, (h, c)), (out_e, (h_e, c_e)) = fused(x), lstm(x)
    assert torch.equal(out, out_e) and torch.equal(h, h_e) and torch.equal(c, c_e)
    assert native_calls


# ---- the CUDA rule and its wrapper, exercised on the CPU -----------------------------------------
# On CUDA a call that needs gradients runs torch's kernel inside native.TorchKernelRNN (cuDNN has no
# double backward); the wrapper is device-agnostic, so these tests run it on the CPU's kernel.


@pytest.fixture
def wrapped(monkeypatch):
    """The CPU native path runs through TorchKernelRNN, as CUDA's does; counts its forwards."""
    calls = []
    original = native.TorchKernelRNN.forward

    def forward(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    monkeypatch.setattr(native, "differentiate_by_wrapper", lambda x: True)
    monkeypatch.setattr(native.TorchKernelRNN, "forward", staticmethod(forward))
    return calls


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_the_wrapper_gives_the_kernels_own_gradients(wrapped, training, packed):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6, **CONFIG).train(training)
    fused = FusedLSTM.from_torch(lstm)
    hx = (torch.randn(4, 4, 3), torch.randn(4, 4, 6))
    x = torch.randn(6, 4, 5)
    if packed:
        lengths = torch.tensor([3, 6, 1, 4])

        def runner(model):
            def run(xi, h):
                out, (hn, cn) = model(pack_padded_sequence(xi, lengths, enforce_sorted=False), h)
                return out.data, (hn, cn)
            return run
    else:
        def runner(model):
            return model
    actual = _loss_and_grads(fused, x, hx, runner(fused))
    expected = _loss_and_grads(lstm, x, hx, runner(lstm))
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    assert wrapped


def test_the_wrapper_survives_a_retained_second_backward(wrapped):
    torch.manual_seed(0)
    fused = FusedLSTM(5, 6, num_layers=2)
    x = torch.randn(4, 2, 5, requires_grad=True)
    loss = fused(x)[0].square().sum()
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(loss, x)[0], first)
    assert wrapped


@pytest.mark.parametrize("packed", [False, True])
def test_the_wrappers_double_backward_recomputes_on_the_reference(wrapped, packed):
    """create_graph=True: the wrapper's gradients are differentiable, and their derivatives match
    nn.LSTM's CPU double backward (torch's CPU kernel is differentiable twice)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, dtype=torch.float64, **CONFIG)
    fused = FusedLSTM.from_torch(lstm)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])

    def second_order(model):
        xi = x.clone().requires_grad_(True)
        inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi
        out = model(inp)[0]
        out = out.data if packed else out
        (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), xi)
        return gx.detach(), ggx

    for a, e in zip(second_order(fused), second_order(lstm)):
        assert_rel_close(a, e, 1e-10)
    assert wrapped


def test_cuda_rule_reasons(monkeypatch):
    """The CUDA rule, read on a CPU tensor that claims to be on CUDA."""
    class OnCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    x = torch.randn(2, 1, 3).as_subclass(OnCuda)
    assert native_path_reason("auto", x) is None
    assert native_path_reason("auto", x.half().as_subclass(OnCuda)) is None
    assert "dropout" in native_path_reason("auto", x, dropout_active=True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    assert "deterministic" in native_path_reason("auto", x)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    with _deterministic():
        assert "deterministic" in native_path_reason("auto", x)


class _deterministic:
    def __enter__(self):
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before)
