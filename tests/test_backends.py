"""Backend selection: the one dispatch point, names, the environment variable, errors."""
from __future__ import annotations

import pytest
import torch

import lstm_kernels
from lstm_kernels import BackendUnsupportedError, FusedLSTM, LSTMLayer, lstm_layer
from lstm_kernels.backends import ENV_VAR, RecurrenceCall, get_backend, resolve_backend


def _call(dtype=torch.float32, device="cpu"):
    return RecurrenceCall(
        seq_len=3, batch=2, hidden_size=4, state_size=4, dtype=dtype, device=torch.device(device),
        has_projection=False, variable_lengths=False, needs_grad=True,
    )


def test_reference_is_always_available():
    assert "reference" in lstm_kernels.available_backends()
    assert "reference" not in lstm_kernels.unavailable_backends()


def test_unavailable_backends_say_why():
    for name, why in lstm_kernels.unavailable_backends().items():
        assert name not in lstm_kernels.available_backends()
        assert isinstance(why, str) and why


def test_auto_picks_the_reference_for_float64_on_cpu():
    assert resolve_backend("auto", _call(torch.float64)).name == "reference"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend("auto", _call()).name == "reference"
    monkeypatch.setenv(ENV_VAR, "no_such_backend")
    with pytest.raises(ValueError, match="unknown LSTM backend"):
        resolve_backend("auto", _call())


def test_named_backend_does_not_consult_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "no_such_backend")
    assert resolve_backend("reference", _call()).name == "reference"


def test_named_backend_that_cannot_serve_raises_with_reason():
    with pytest.raises(BackendUnsupportedError, match="'reference' cannot serve this call: dtype torch.int32"):
        resolve_backend("reference", _call(torch.int32))


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_kernel_backends_refuse_what_they_cannot_serve(name):
    """Named kernel backends either serve a call or raise naming why: never a silent fallback."""
    backend = lstm_kernels.backends._REGISTRY.get(name)
    if backend is None:
        pytest.skip(f"{name} backend is not importable here")
    why = backend.unavailable_reason() or backend.supports(_call(torch.float64))
    assert why, f"{name} must decline float64"
    x = torch.randn(2, 1, 16, dtype=torch.float64)
    w, h, c = torch.randn(16, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(BackendUnsupportedError, match=name):
        LSTMLayer.apply(x, w, h, c, None, None, name)


def test_module_backend_argument_reaches_dispatch(monkeypatch):
    seen = []
    reference = get_backend("reference")
    original = type(reference).forward

    def spy(self, *args, **kwargs):
        seen.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(reference), "forward", spy)
    FusedLSTM(3, 4, num_layers=2, bidirectional=True, backend="reference")(torch.randn(2, 1, 3))
    assert seen == ["reference"] * 4


def test_double_backward_through_a_non_differentiable_backend_raises(monkeypatch):
    reference = get_backend("reference")
    monkeypatch.setattr(type(reference), "differentiable_backward", False)
    x = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    out, _ = FusedLSTM(3, 4, dtype=torch.float64, backend="reference")(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=False)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_triton_refuses_calls_whose_offsets_pass_int32():
    """The Triton kernels index with int32 (t * B * 4H and the like): a call whose tensors reach 2**31
    elements is refused with the reason, not served with wrapped offsets (no allocation needed)."""
    triton_backend = pytest.importorskip("lstm_kernels.backends.triton")
    backend = triton_backend.TritonBackend()
    from lstm_kernels.backends.triton.config import interpreting

    if interpreting():
        pytest.skip("under the interpreter CUDA calls are not served at all")

    def call(T, B, H):
        return RecurrenceCall(seq_len=T, batch=B, hidden_size=H, state_size=H, dtype=torch.float16,
                              device=torch.device("cuda"), has_projection=False, variable_lengths=False,
                              needs_grad=True)

    assert 4096 * 64 * 4 * 2048 == 2**31
    assert "int32" in backend.supports(call(4096, 64, 2048))
    assert backend.supports(call(4095, 64, 2048)) is None


def test_no_grad_calls_ask_for_no_workspace(monkeypatch):
    """Under torch.no_grad the backend runs its inference kernels (no saved activations), even when the
    inputs require gradients; with grad enabled it keeps what backward needs."""
    reference = get_backend("reference")
    seen = []
    original = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *a: seen.append(a[-1]) or original(*a))
    xg, w = torch.randn(3, 2, 20, requires_grad=True), torch.randn(20, 5, requires_grad=True)
    h0, c0 = torch.zeros(2, 5), torch.zeros(2, 5)
    with torch.no_grad():
        out = lstm_layer(xg, w, h0, c0, backend="reference")
    assert seen == [False] and not out[0].requires_grad
    lstm_layer(xg, w, h0, c0, backend="reference")[0].sum().backward()
    assert seen == [False, True] and xg.grad is not None
