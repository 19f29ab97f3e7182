"""What the Triton launch helpers launch, without launching it.

``record_launches`` replaces the kernels in the launch modules (the per-step kernels of
step_forward / step_backward and the persistent ones as persistent launches them) by recorders,
so that ``lstm_forward`` / ``lstm_backward`` run their whole host path (choice of variant, plan,
launch configuration, buffers, row counts) and record each launch's grid, arguments and keywords.
With ``meta`` tensors that host path runs on any machine, at any size, and touches no data:
a host read of device data (``.item()``, ``.tolist()``) fails on a meta tensor.

``jit_compile_inputs`` then turns one recorded launch into what Triton's JIT would compile
for it (the signature, the constexprs and the specialisation attributes: 16-byte pointer
alignment, integers divisible by 16), using the JIT's own binder, so an ahead-of-time
compile builds the kernel that runs (tests/test_triton_aot.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lstm_kernels.backends.triton import launch, persistent, step_backward, step_forward


@dataclass
class Launch:
    kernel: object  # the real @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded, not run,
    into ``launches`` (which recorders of one direction share)."""
    kernel: object
    launches: list = field(default_factory=list)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))
        return launch


#: (module, kernel name) of the forward's and the backward's kernels, as their launch helpers look them up.
FORWARD_KERNELS = ((step_forward, "_step_fw_kernel"), (persistent, "_lstm_pfw_kernel"))
BACKWARD_KERNELS = ((step_backward, "_step_bw_kernel"), (persistent, "_lstm_pbw_kernel"))


def record_launches(monkeypatch):
    """Replace the forward and backward kernels by recorders; returns (forward, backward) recorders,
    whose ``launches`` hold every launch of that direction in order (each with its real kernel)."""
    def real(kernel):  # a recorder recorded again records for the same kernel
        return kernel.kernel if isinstance(kernel, Recorder) else kernel

    recorders = []
    for kernels in (FORWARD_KERNELS, BACKWARD_KERNELS):
        launches = []
        for module, name in kernels:
            monkeypatch.setattr(module, name, Recorder(real(getattr(module, name)), launches))
        recorders.append(getattr(kernels[0][0], kernels[0][1]))
    return tuple(recorders)


def meta_case(T, B, H, dtype, proj=0, batch_sizes=None, cell="lstm"):
    """Recurrence inputs on the meta device (shapes and dtypes only); ``cell="gru"``: the GRU's (3H
    gate rows, b_hn, no cell state, no projection)."""
    P = proj or H

    def t(*shape):
        return torch.empty(*shape, dtype=dtype, device="meta")

    if cell == "gru":
        return dict(cell=cell, xg=t(T, B, 3 * H), w_hh=t(3 * H, H), h0=t(B, H), c0=None, w_hr=None, b_hn=t(H),
                    batch_sizes=batch_sizes, dh_all=t(T, B, H), dh_T=t(B, H), dc_T=None)
    return dict(xg=t(T, B, 4 * H), w_hh=t(4 * H, P), h0=t(B, P), c0=t(B, H), w_hr=t(P, H) if proj else None,
                batch_sizes=batch_sizes, dh_all=t(T, B, P), dh_T=t(B, P), dc_T=t(B, H))


def run_host_path(case, variant, needs_grad=True):
    """lstm_forward (and lstm_backward when ``needs_grad``) of ``case`` with the kernels recorded."""
    gru = {"cell": "gru"} if case.get("cell") == "gru" else {}
    h_all, h_T, c_T, ws = launch.lstm_forward(
        case["xg"], case["w_hh"], case["h0"], case["c0"], case["w_hr"], case["batch_sizes"],
        store_workspace=needs_grad, variant=variant, **gru, **({"b_hn": case["b_hn"]} if gru else {}))
    if needs_grad:
        launch.lstm_backward(case["xg"], case["w_hh"], case["c0"], case["w_hr"], ws, case["dh_all"], case["dh_T"],
                             case["dc_T"], case["batch_sizes"], variant=variant, **gru,
                             **({"h0": case["h0"], "h_all": h_all} if gru else {}))
    return h_all, h_T, c_T, ws


class JitApiUnsupported(Exception):
    """This Triton's JIT internals differ from the ones ``jit_compile_inputs`` knows."""


def jit_compile_inputs(launch: Launch, backend):
    """(signature, constexprs, attrs, options) that Triton's JIT builds for ``launch`` on ``backend``
    (``triton.compiler.make_backend(target)``): its binder specialises the arguments as a real
    launch does (pointer alignment from ``data_ptr()``, integer divisibility, do_not_specialize).

    Known to work with the JIT of Triton 3.6 to 3.9; raises JitApiUnsupported elsewhere.
    """
    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as err:
        raise JitApiUnsupported(f"triton.runtime.jit lacks {err.name!r}") from err
    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, _ = binder(*launch.args, **kwargs)
    except TypeError as err:
        raise JitApiUnsupported(f"the JIT binder's interface differs: {err}") from err
    if not hasattr(fn, "_pack_args"):  # since Triton 3.4
        raise JitApiUnsupported("triton.runtime.jit.JITFunction lacks _pack_args")
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, None)
    return signature, constexprs, attrs, options


def specialization_key(launch: Launch, backend) -> str:
    """The JIT's cache key of ``launch`` (one compilation per distinct key)."""
    signature, constexprs, attrs, options = jit_compile_inputs(launch, backend)
    return repr((sorted(signature.items()), sorted(constexprs.items(), key=repr), sorted(attrs.items(), key=repr),
                 sorted(options.__dict__.items(), key=repr)))
