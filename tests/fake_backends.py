"""Backends that ask for verification on any device, for the tests of lstm_kernels.verification.

``wrong``: the reference with h_all and h_T one percent off (what a kernel with a bad tile does).
``right``: the reference itself. ``raising``: a kernel whose launch fails (a grid barrier that gave
up, say). ``wrong_gru``: right for the LSTM, and for the GRU a d_hn one percent off (a backward
that drops a factor). Each serves both cells and counts its forward calls.
"""
from __future__ import annotations

from lstm_kernels.backends import _REGISTRY, Backend, get_backend, register
from lstm_kernels.cells import GRU, LSTM


class _Verified(Backend):
    differentiable_backward = False
    cells = (LSTM, GRU)

    def __init__(self, name: str):
        self.name = name
        self.forward_calls = 0

    def verify_on_first_use(self, call) -> bool:
        return True

    def supports(self, call):
        return None if call.dtype.is_floating_point else "not a float"

    def forward(self, xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad, **cell):
        self.forward_calls += 1
        return get_backend("reference").forward(xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad, **cell)

    def backward(self, inputs, h_all, workspace, dh_all, dh_T, dc_T, **cell):
        return get_backend("reference").backward(inputs, h_all, workspace, dh_all, dh_T, dc_T, **cell)


class Wrong(_Verified):
    def forward(self, *args, **cell):
        h_all, h_T, c_T, workspace = super().forward(*args, **cell)
        return h_all * 1.01, h_T * 1.01, c_T, workspace


class WrongGRUGradient(_Verified):
    def backward(self, inputs, *args, **cell):
        dG, dh0, dc0, extra = super().backward(inputs, *args, **cell)
        return dG, dh0, dc0, extra * 1.01 if inputs.cell == GRU else extra


class Raising(_Verified):
    def forward(self, *args, **cell):
        self.forward_calls += 1
        raise RuntimeError("triton forward: grid barrier 3 timed out (waited for 96 arrivals, saw 95)")


def install() -> dict:
    """Register the fake backends; returns them by name."""
    fakes = {"wrong": Wrong("wrong"), "right": _Verified("right"), "raising": Raising("raising"),
             "wrong_gru": WrongGRUGradient("wrong_gru")}
    for backend in fakes.values():
        register(backend)
    return fakes


def uninstall() -> None:
    for name in ("wrong", "right", "raising", "wrong_gru"):
        _REGISTRY.pop(name, None)
