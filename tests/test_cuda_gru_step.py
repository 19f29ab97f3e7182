"""The GRU in the CUDA per-step kernels, without a GPU: compiled for sm_80 and sm_90 and read from
the cubins, its cell math run on the host, and the backend's host path with a recording extension.

``csrc/step/step_forward.cu`` and ``step_backward.cu`` take the cell as the template parameter
GATES (4: the LSTM, 3: the GRU); one kernel, no second copy of the step loop. Checked here:

- both cells' instances exist for every dtype, tensor-core switch and resets switch;
- a structural count (a CPU proxy, not a measurement): the forward's k loop (the innermost loop of
  the fp32-FMA instance) issues 3/4 of the LSTM's FMAs (three gates' products, none for a fourth);
  the backward's k loop (one product over the GATES*H rows, whose trip count differs) does the
  LSTM's work per iteration (the same loads and FMAs; only its counter arithmetic differs); the GRU
  instances use no local memory;
- ``common/cell.cuh``'s GRU forward and backward (the functions the kernels run), on the host,
  against float64 and autograd;
- the backend's host path (``backends/cuda/step.py``) hands the GRU's pointers, ``gates=3`` and
  b_hn to the extension and returns the contract's shapes, and so do the fused kernels'
  (``backends/cuda/fused.py``: gates=3, b_hn; h0, h_all, d_hn; the per-step kernels' workspace);
  dispatch serves every GRU call the LSTM's would (packed calls and the persistent variant included).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from cuda_tools import CUOBJDUMP, NVCC, compile_cubins
from test_cuda_step_budget import functions_of, loops_of, opcode

ARCHS = ("sm_80", "sm_90")
DTYPES = ("f", "6__half", "13__nv_bfloat16")  # the mangled template arguments

needs_nvcc = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")


@pytest.fixture(scope="module")
def step_sass(tmp_path_factory):
    """{(arch, kernel name): [(addr, text)]} of the per-step kernels and the res-usage text."""
    listings, usage = compile_cubins(["step/step_forward.cu", "step/step_backward.cu"], ARCHS,
                                     tmp_path_factory.mktemp("step_cubins"))
    return functions_of(listings), usage


def instance(funcs, arch: str, direction: str, dtype: str, gates: int, mma: bool, resets: bool):
    """The instructions of one template instance, found by its mangled name."""
    tag = f"_step_kernelI{dtype}Li{gates}ELb{int(mma)}ELb{int(resets)}EE"
    found = [instrs for (a, name), instrs in funcs.items() if a == arch and direction in name and tag in name]
    assert len(found) == 1, f"{direction} {tag} on {arch}: {len(found)} instances"
    return found[0]


#: The opcodes of a k loop's work (its loads, FMAs, stores); the rest is loop control.
WORK = {"FFMA", "LDS", "LDG", "STS", "HMMA"}


def k_loop_profile(instrs) -> Counter:
    """Counts of the work opcodes (WORK) of the innermost loop that holds FFMA (the fp32 k loop)."""
    loops = [lp for lp in loops_of(instrs) if any(lp.holds(a) and opcode(t) == "FFMA" for a, t in instrs)]
    assert loops, "no loop with FFMA"
    inner = [lp for lp in loops if not any(other.inside(lp) for other in loops)]
    k = min(inner, key=lambda lp: lp.end - lp.start)
    return Counter(opcode(t) for a, t in instrs if k.holds(a) and opcode(t) in WORK)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_both_cells_are_instances_of_one_kernel(step_sass, arch):
    funcs, _ = step_sass
    for direction in ("forward", "backward"):
        for dtype in DTYPES:
            for gates in (3, 4):
                for mma in (False, True):
                    for resets in (False, True):
                        assert instance(funcs, arch, direction, dtype, gates, mma, resets)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gru_forward_k_loop_has_three_quarters_of_the_lstms_products(step_sass, arch, dtype):
    funcs, _ = step_sass
    gru = k_loop_profile(instance(funcs, arch, "forward", dtype, 3, False, False))
    lstm = k_loop_profile(instance(funcs, arch, "forward", dtype, 4, False, False))
    assert gru["FFMA"] > 0 and 4 * gru["FFMA"] == 3 * lstm["FFMA"], (gru, lstm)
    gru_bw = k_loop_profile(instance(funcs, arch, "backward", dtype, 3, False, False))
    lstm_bw = k_loop_profile(instance(funcs, arch, "backward", dtype, 4, False, False))
    assert gru_bw == lstm_bw, (gru_bw, lstm_bw)


@needs_nvcc
def test_the_gru_instances_use_no_local_memory(step_sass):
    _, usage = step_sass
    blocks = [b for b in usage.split("Function ")[1:] if "Li3E" in b.split(":", 1)[0]]
    assert len(blocks) == 2 * len(ARCHS) * len(DTYPES) * 4, len(blocks)
    for block in blocks:
        assert "LOCAL:0" in block.replace(" ", ""), block[:200]


# ---- the cell math on the host ------------------------------------------------------------------

try:
    from lstm_kernels import _C
except ImportError:
    _C = None


@pytest.mark.skipif(_C is None, reason="lstm_kernels._C is not built (no nvcc)")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "precise"])
def test_gru_cell_math_matches_float64_and_autograd(fast):
    """gru_cell_forward / gru_cell_backward of common/cell.cuh, with either activation policy, against the
    reference equations in float64 (autograd for the backward), including saturated gates."""
    rng = np.random.default_rng(0)
    n = 512
    pre = rng.normal(0.0, 3.0, size=(n, 4)).astype(np.float32)  # pr, pz, xn, hn
    pre[: n // 8] = rng.choice(np.array([-30.0, 30.0, -100.0, 100.0, 0.0], dtype=np.float32), size=(n // 8, 4))
    h_prev = rng.normal(0.0, 1.0, size=n).astype(np.float32)
    dh = rng.normal(0.0, 1.0, size=n).astype(np.float32)
    act, h = _C.gru_cell_forward_host(pre, h_prev, fast)
    grads = _C.gru_cell_backward_host(dh, act, pre[:, 3].copy(), h_prev)  # [n, 5]: r, z, n, hn, h_prev

    leaves = [torch.tensor(pre[:, k], dtype=torch.float64, requires_grad=True) for k in range(4)]
    hp = torch.tensor(h_prev, dtype=torch.float64, requires_grad=True)
    r, z = leaves[0].sigmoid(), leaves[1].sigmoid()
    pre_n = leaves[2] + r * leaves[3]
    n_gate = pre_n.tanh()
    h64 = (1 - z) * n_gate + z * hp
    np.testing.assert_allclose(act, torch.stack([r, z, n_gate], 1).detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, h64.detach().numpy(), rtol=1e-5, atol=1e-6)
    d_pr, d_pz, d_xn, d_hn, d_hp = torch.autograd.grad(h64, [*leaves, hp], torch.tensor(dh, dtype=torch.float64))
    # d_xn is the gradient of n's pre-activation; the pre-activations of r and z are pr, pz
    expected = torch.stack([d_pr, d_pz, d_xn, d_hn, d_hp], 1).numpy()
    np.testing.assert_allclose(grads, expected, rtol=1e-4, atol=1e-5)


# ---- the backend's host path --------------------------------------------------------------------


class RecordingExtension:
    """Stands in for ``_C``: records the step entries' calls (pointers, sizes, keywords)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("step_"):
            return lambda *args, **kwargs: self.calls.append((name, args, kwargs))
        raise AttributeError(name)


def test_the_gru_host_path_passes_the_cell_and_returns_the_contracts_shapes(monkeypatch):
    from lstm_kernels.backends.cuda import extension, step

    fake = RecordingExtension()
    monkeypatch.setattr(extension, "_C", fake)
    monkeypatch.setattr(extension, "dtype_codes", lambda: {torch.float32: 0})
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())

    class Stream:
        cuda_stream = 7

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    T, B, H = 3, 2, 5
    xg, w_hh, h0, b_hn = torch.randn(T, B, 3 * H), torch.randn(3 * H, H), torch.randn(B, H), torch.randn(H)
    h_all, h_T, c_T, workspace = step.forward(xg, w_hh, h0, None, True, mma=False, cell="gru", b_hn=b_hn)
    assert c_T is None and h_all.shape == (T, B, H) and h_T.shape == (B, H)
    assert [w.shape for w in workspace] == [(T, B, 3 * H), (T, B, H)]
    name, args, kwargs = fake.calls[-1]
    assert name == "step_forward" and kwargs["gates"] == 3 and kwargs["b_hn"] == b_hn.data_ptr()
    assert args[4] == 0 and args[6] == 0  # c0 and c_T: null for the GRU
    assert args[-4:-1] == (T, B, H)

    dG, dh0, dc0, d_hn = step.backward(w_hh, None, *workspace, torch.randn(T, B, H), torch.randn(B, H), None,
                                       mma=False, cell="gru", h0=h0, h_all=h_all)
    assert dG.shape == (T, B, 3 * H) and dh0.shape == (B, H) and dc0 is None and d_hn.shape == (T, B, H)
    name, args, kwargs = fake.calls[-1]
    assert name == "step_backward" and kwargs["gates"] == 3
    assert kwargs["h0"] == h0.data_ptr() and kwargs["h_all"] == h_all.data_ptr() and kwargs["d_hn"] == d_hn.data_ptr()


def test_the_fused_gru_forward_host_path_passes_the_cell(monkeypatch):
    """fused.forward with cell="gru" hands the extension gates=3 and b_hn, no c0 / c_work / c_T, and
    returns the per-step kernels' workspace shapes (r, z, n and hn), which the per-step backward reads;
    the LSTM's call is as before (no cell keywords)."""
    from lstm_kernels.backends.cuda import fused

    calls = []

    def entry(*args, **kwargs):
        calls.append((args, kwargs))
        return 0

    class Stream:
        cuda_stream = 7

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    T, B, H = 3, 2, 5
    xg, w_hh, h0, b_hn = torch.randn(T, B, 3 * H), torch.randn(3 * H, H), torch.randn(B, H), torch.randn(H)
    h_all, h_T, c_T, workspace = fused.forward(entry, xg, w_hh, h0, None, None, None, True, False, cell="gru",
                                               b_hn=b_hn)
    assert c_T is None and h_all.shape == (T, B, H) and h_T.shape == (B, H)
    assert [w.shape for w in workspace] == [(T, B, 3 * H), (T, B, H)]
    args, kwargs = calls[-1]
    assert kwargs["gates"] == 3 and kwargs["b_hn"] == b_hn.data_ptr()
    assert args[4] == 0 and args[5] == 0 and args[10] == 0  # c0, c_work and c_T: null for the GRU
    fused.forward(entry, torch.randn(T, B, 4 * H), torch.randn(4 * H, H), h0, torch.randn(B, H), None, None, True,
                  False)
    assert "gates" not in calls[-1][1] and calls[-1][0][4] != 0
    # the backward on that workspace: gates=3, h0 in c0's place, h_all and d_hn; no dc_T, dc0
    h_all = torch.randn(T, B, H)
    dG, dh0, dc0, d_hn = fused.backward(entry, w_hh, None, *workspace, None, torch.randn(T, B, H), torch.randn(B, H),
                                        None, None, False, cell="gru", h0=h0, h_all=h_all)
    assert dG.shape == (T, B, 3 * H) and dh0.shape == (B, H) and dc0 is None and d_hn.shape == (T, B, H)
    args, kwargs = calls[-1]
    assert kwargs["gates"] == 3 and kwargs["h_all"] == h_all.data_ptr() and kwargs["d_hn"] == d_hn.data_ptr()
    assert args[5] == h0.data_ptr() and args[8] == 0 and args[14] == 0  # h0 as c0; dc_T and dc0 null
    assert args[18:22] == (T, B, H, H)


def test_dispatch_serves_the_gru_by_the_fused_kernels(monkeypatch):
    """The fused kernels serve the GRU both ways: packed GRU calls (the fused kernels' alone) are served
    with and without gradients, and so is the persistent variant."""
    from lstm_kernels.backends import RecurrenceCall
    from lstm_kernels.backends import cuda as cuda_backend

    def call(**kw):
        fields = dict(seq_len=4, batch=3, hidden_size=8, state_size=8, dtype=torch.float16,
                      device=torch.device("cuda"), has_projection=False, variable_lengths=False, needs_grad=True,
                      cell="gru")
        return RecurrenceCall(**{**fields, **kw})

    backend = cuda_backend.CudaBackend()
    for needs_grad in (True, False):
        assert backend.supports(call(variable_lengths=True, needs_grad=needs_grad)) is None
        assert backend.supports(call(needs_grad=needs_grad)) is None
    assert cuda_backend.fused.fused_unserved_reason(call()) is None
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, "persistent")
    assert backend.supports(call()) is None
    # the GRU's backward block holds 3H of W_hh^T, not 4H: it fits where the LSTM's does not
    plan = cuda_backend.fused.Plan(16, 1000, None, 3)
    assert plan.smem_bytes("backward") < cuda_backend.fused.Plan(16, 1000).smem_bytes("backward")
