"""The CUDA extension without a GPU: it imports, its host-side cell math (csrc/common/cell.cuh,
the same functions the kernels run) matches the reference, and the backend says why it
is unavailable. Skips when ``lstm_kernels._C`` is not built (no nvcc)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lstm_kernels.backends import RecurrenceCall, get_backend, unavailable_backends
from lstm_kernels.backends import cuda as cuda_backend
from lstm_kernels.backends.cuda import extension as cuda_ext
from lstm_kernels.backends.reference import ReferenceBackend

try:
    from lstm_kernels import _C
except ImportError:
    _C = None

needs_ext = pytest.mark.skipif(_C is None, reason="lstm_kernels._C is not built (no nvcc)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def _pre_acts(n: int, seed: int) -> np.ndarray:
    """Pre-activations [n, 4]: mostly N(0, 3), plus extremes of +-30 and +-100."""
    rng = np.random.default_rng(seed)
    pre = rng.normal(0.0, 3.0, size=(n, 4)).astype(np.float32)
    pre[: n // 8] = rng.choice(np.array([-30.0, 30.0, -100.0, 100.0, 0.0], dtype=np.float32), size=(n // 8, 4))
    return pre


def _sig64(x):
    return 1.0 / (1.0 + np.exp(-x))


def _forward64(pre, c_prev):
    p = pre.astype(np.float64)
    i, f, g, o = _sig64(p[:, 0]), _sig64(p[:, 1]), np.tanh(p[:, 2]), _sig64(p[:, 3])
    c = f * c_prev.astype(np.float64) + i * g
    return np.stack([i, f, g, o], axis=1), c, o * np.tanh(c)


def _backward64(dh, dc, act, c_prev, c):
    dh, dc, c_prev, c = (v.astype(np.float64) for v in (dh, dc, c_prev, c))
    i, f, g, o = act.astype(np.float64).T
    tc = np.tanh(c)
    dct = dc + dh * o * (1 - tc * tc)
    d = np.stack([dct * g * i * (1 - i), dct * c_prev * f * (1 - f), dct * i * (1 - g * g), dh * tc * o * (1 - o)], 1)
    return d, dct * f


def _close(actual, expected, name, rtol=1e-5, atol=1e-6):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert not np.isnan(actual).any(), f"{name}: NaN"
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        err = np.abs(actual - expected)
        raise AssertionError(
            f"{name}: {bad.sum()} mismatches; max abs {err.max():.3e}, mean abs {err.mean():.3e}; "
            f"first at {idx}: {actual[idx]!r} vs {expected[idx]!r}"
        )


@needs_ext
def test_extension_imports_and_reports_devices():
    n, why = _C.device_count()
    assert isinstance(n, int) and n >= 0
    if n == 0:
        assert isinstance(why, str) and why
    assert {_C.DTYPE_FLOAT32, _C.DTYPE_FLOAT16, _C.DTYPE_BFLOAT16} == {0, 1, 2}


#: The cell's two activation policies (csrc/common/cell.cuh): fast (the 16-bit and tf32 kernels) and
#: precise (float32 accuracy); the host runs each with correctly rounded primitives.
ACTIVATIONS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "precise"])


@needs_ext
@ACTIVATIONS
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_cell_forward_matches_float64(seed, fast):
    n = 4096
    pre = _pre_acts(n, seed)
    c_prev = np.random.default_rng(seed + 100).normal(0.0, 2.0, size=n).astype(np.float32)
    act, c, h = _C.cell_forward_host(pre, c_prev, fast)
    act64, c64, h64 = _forward64(pre, c_prev)
    _close(act, act64, "activations")
    _close(c, c64, "c")
    _close(h, h64, "h")


@needs_ext
@ACTIVATIONS
def test_host_cell_forward_extremes_saturate_exactly(fast):
    pre = np.array([[-100, 100, -100, 100], [100, -100, 100, -100], [-30, 30, -30, 30]], dtype=np.float32)
    act, c, h = _C.cell_forward_host(pre, np.array([1.5, -2.0, 0.5], dtype=np.float32), fast)
    assert np.isfinite(act).all() and np.isfinite(c).all() and np.isfinite(h).all()
    assert act[0].tolist() == [0.0, 1.0, -1.0, 1.0]
    assert act[1].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert c[0] == np.float32(1.5) and c[1] == np.float32(1.0)


@needs_ext
@ACTIVATIONS
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_cell_backward_matches_float64(seed, fast):
    n = 4096
    rng = np.random.default_rng(seed)
    pre = _pre_acts(n, seed)
    c_prev = rng.normal(0.0, 2.0, size=n).astype(np.float32)
    act, c, _ = _C.cell_forward_host(pre, c_prev, fast)
    dh = rng.normal(size=n).astype(np.float32)
    dc = rng.normal(size=n).astype(np.float32)
    d_pre, dc_prev = _C.cell_backward_host(dh, dc, act, c_prev, c, fast)
    d64, dcp64 = _backward64(dh, dc, act, c_prev, c)
    _close(d_pre, d64, "d_pre")
    _close(dc_prev, dcp64, "dc_prev")


@needs_ext
@ACTIVATIONS
@pytest.mark.parametrize("seed", [0, 1])
def test_host_cell_matches_reference_backend_one_step(seed, fast):
    """One step with W_hh = 0 is the cell alone: compare with the reference backend's forward and BPTT."""
    torch.manual_seed(seed)
    B, H = 64, 16
    xg = torch.randn(1, B, 4 * H) * 4
    xg[0, :4] = 30.0
    xg[0, 4:8] = -30.0
    c0 = torch.randn(B, H) * 2
    h0 = torch.randn(B, H)
    w_hh = torch.zeros(4 * H, H)
    ref = ReferenceBackend()
    h_all, _, c_T, _ = ref.forward(xg, w_hh, h0, c0, None, None, True)
    pre = xg[0].reshape(B, 4, H).permute(0, 2, 1).reshape(-1, 4).numpy()  # [(b, j), gate]
    act, c, h = _C.cell_forward_host(pre, c0.reshape(-1).numpy(), fast)
    _close(h, h_all[0].reshape(-1).numpy(), "h vs reference")
    _close(c, c_T.reshape(-1).numpy(), "c vs reference")

    from lstm_kernels.backends import RecurrenceInputs

    dh = torch.randn(1, B, H)
    dc = torch.randn(B, H)
    inputs = RecurrenceInputs(xg, w_hh, h0, c0, None, None)
    dG, _, dc0, _ = ref.backward(inputs, h_all, (), dh, torch.zeros(B, H), dc)
    d_pre, dc_prev = _C.cell_backward_host(dh[0].reshape(-1).numpy(), dc.reshape(-1).numpy(), act,
                                           c0.reshape(-1).numpy(), c, fast)
    d_ref = dG[0].reshape(B, 4, H).permute(0, 2, 1).reshape(-1, 4).numpy()
    _close(d_pre, d_ref, "dG vs reference")
    _close(dc_prev, dc0.reshape(-1).numpy(), "dc0 vs reference")


@needs_ext
def test_host_cell_rejects_bad_shapes():
    with pytest.raises(ValueError):
        _C.cell_forward_host(np.zeros((3, 3), np.float32), np.zeros(3, np.float32), True)
    with pytest.raises(ValueError):
        _C.cell_backward_host(*(np.zeros(2, np.float32),) * 2, np.zeros((3, 4), np.float32), *(np.zeros(3, np.float32),) * 2,
                              True)


@needs_ext
def test_argument_checks_raise_value_errors():
    args = dict(dtype=0, xg=8, w_hh=8, h0=8, c0=8, h_all=8, c_T=8, act=8, c_all=8, c_work=0, T=1, B=1, H=1, stream=0)
    with pytest.raises(ValueError, match="dtype code"):
        _C.step_forward(**{**args, "dtype": 7})
    with pytest.raises(ValueError, match="T, B and H"):
        _C.step_forward(**{**args, "T": 0})
    with pytest.raises(ValueError, match="null pointer for w_hh"):
        _C.step_forward(**{**args, "w_hh": 0})
    with pytest.raises(ValueError, match="act and c_all"):
        _C.step_forward(**{**args, "act": 0})
    with pytest.raises(ValueError, match="unknown kernel direction"):
        _C.fused_plan("nope", 1, 16, 16, 16)


@needs_ext
@no_gpu
def test_launch_without_gpu_raises_naming_the_kernel():
    if _C.device_count()[0] != 0:
        pytest.skip("a CUDA device is visible to the runtime")
    # Non-null fake pointers: the launch fails before any memory is touched.
    with pytest.raises(RuntimeError, match="forward_step_kernel failed: "):
        _C.step_forward(0, 8, 8, 8, 8, 8, 8, 0, 0, 8, 2, 1, 1, 0)
    with pytest.raises(RuntimeError, match="backward_step_kernel failed: "):
        _C.step_backward(0, *([8] * 12), 2, 1, 1, 0)
    with pytest.raises(RuntimeError, match="fused plan"):
        _C.fused_plan("forward", 1, 16, 16, 16)
    with pytest.raises(RuntimeError, match=r"fused_forward_kernel \(cooperative launch\)"):
        _C.fused_forward(1, 8, 8, 0, *([8] * 11), 2, 1, 16, 16, 1, 0)


@no_gpu
def test_backend_unavailable_reason_here():
    backend = get_backend("cuda")
    expected = cuda_backend.NO_GPU if _C is not None else cuda_backend.NOT_BUILT
    assert backend.unavailable_reason().startswith(expected)
    assert unavailable_backends()["cuda"].startswith(expected)


def test_variant_env(monkeypatch):
    monkeypatch.delenv(cuda_backend.VARIANT_ENV, raising=False)
    assert cuda_backend.requested_variant() == cuda_backend.DEFAULT_VARIANT
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, "persistent")
    assert cuda_backend.requested_variant() == "persistent"
    monkeypatch.setenv(cuda_backend.VARIANT_ENV, "bogus")
    with pytest.raises(ValueError, match="LSTM_KERNELS_CUDA_VARIANT"):
        cuda_backend.requested_variant()


def _check_variant_switch(monkeypatch, env: str, chosen, on: str, bad: str):
    """A variant switch of the fused kernels: ``chosen()`` is False with ``env`` unset and True under ``on``,
    whose plan signature differs (verification admits each under its own key); ``bad`` is a ValueError
    naming ``env``."""
    backend = get_backend("cuda")
    monkeypatch.delenv(env, raising=False)
    assert chosen() is False
    default = backend.plan_signature(_call())
    monkeypatch.setenv(env, on)
    assert chosen() is True
    assert backend.plan_signature(_call()) != default
    monkeypatch.setenv(env, bad)
    with pytest.raises(ValueError, match=env):
        chosen()


def test_fused_weights_env_selects_the_register_path_under_its_own_plan(monkeypatch):
    """LSTM_KERNELS_CUDA_FUSED_WEIGHTS: ``shared`` by default (the kernels as measured so far), ``registers``
    opts in; the plan signature differs, so verification admits each under its own key; a bad value raises."""
    _check_variant_switch(monkeypatch, cuda_backend.WEIGHTS_ENV, cuda_backend.fused_weights_in_registers,
                          "registers", "smem")


def test_fused_forward_hands_the_weights_switch_to_the_kernel(monkeypatch):
    """fused.forward passes w_registers=1 to the extension only under ``registers`` (the C API's default, 0,
    reads W from shared memory every step)."""
    from lstm_kernels.backends.cuda import fused

    calls = []

    class Stream:
        cuda_stream = 7

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    T, B, H = 2, 2, 4
    args = (torch.randn(T, B, 4 * H), torch.randn(4 * H, H), torch.randn(B, H), torch.randn(B, H), None, None, False,
            False)
    for value, expected in (("shared", None), ("registers", 1)):
        monkeypatch.setenv(cuda_backend.WEIGHTS_ENV, value)
        fused.forward(lambda *a, **kw: calls.append(kw) or 0, *args)
        assert calls[-1].get("w_registers") == expected, (value, calls[-1])


def test_fused_exchange_switch_selects_its_own_plan(monkeypatch):
    """LSTM_KERNELS_CUDA_FUSED_EXCHANGE: ``counter`` by default; ``tagged`` implies the weights in registers
    and is a plan of its own (verified under its own key); another value is a ValueError naming it."""
    backend = get_backend("cuda")
    monkeypatch.delenv(cuda_backend.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(cuda_backend.EXCHANGE_ENV, raising=False)
    assert cuda_backend.fused_exchange_tagged() is False
    counter = backend.plan_signature(_call())
    monkeypatch.setenv(cuda_backend.WEIGHTS_ENV, "registers")
    registers = backend.plan_signature(_call())
    monkeypatch.setenv(cuda_backend.WEIGHTS_ENV, "shared")
    monkeypatch.setenv(cuda_backend.EXCHANGE_ENV, "tagged")
    assert cuda_backend.fused_exchange_tagged() is True and cuda_backend.fused_weights_in_registers() is True
    assert len({counter, registers, backend.plan_signature(_call())}) == 3
    monkeypatch.setenv(cuda_backend.EXCHANGE_ENV, "flags")
    with pytest.raises(ValueError, match="LSTM_KERNELS_CUDA_FUSED_EXCHANGE"):
        cuda_backend.fused_exchange_tagged()


@pytest.mark.parametrize("tile", ["wide", "narrow"])
def test_fused_backward_switch_selects_its_own_plan(monkeypatch, tile):
    """LSTM_KERNELS_CUDA_FUSED_BACKWARD: ``ring`` by default; ``wide`` and ``narrow`` are plans of their own
    (verified under their own keys, and candidates of ``check``); another value is a ValueError naming it."""
    _check_variant_switch(monkeypatch, cuda_backend.BACKWARD_ENV, lambda: cuda_backend.fused_backward_tile() == tile,
                          tile, "16")
    backend = get_backend("cuda")
    signatures = set()
    for value in cuda_backend.BACKWARDS:
        monkeypatch.setenv(cuda_backend.BACKWARD_ENV, value)
        signatures.add(backend.plan_signature(_call()))
    assert len(signatures) == len(cuda_backend.BACKWARDS) == 3
    assert {env[cuda_backend.BACKWARD_ENV] for env in cuda_backend.FUSED_CANDIDATES.values()} == {"ring", "wide",
                                                                                                  "narrow"}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_backward_hands_the_tile_to_the_kernel(monkeypatch, cell):
    """fused.backward passes the C API's tile code to the extension under ``wide`` (1) and ``narrow`` (2) only
    (the default, 0, runs the ring's kernel; the kernel itself falls back to it where the tile asked for does not
    serve), one grid-barrier counter per batch tile of the tile asked for (8 rows in the narrow one: at least
    the ring's), and a W^T of whole 16-unit blocks (the wide and narrow blocks read 16 rows)."""
    from lstm_kernels.backends.cuda import fused

    calls = []

    class Stream:
        cuda_stream = 7

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    T, B, H = 2, 17, 20  # 2 batch tiles of 16 rows, 3 of 8
    n_gates = 4 if cell == "lstm" else 3
    w_rows = []
    interleave = fused.interleave_backward
    monkeypatch.setattr(fused, "interleave_backward", lambda *a: w_rows.append(interleave(*a).shape[0]) or
                        interleave(*a))
    counters = []
    ptr = fused._ptr
    monkeypatch.setattr(fused, "_ptr", lambda t: counters.append(t) or ptr(t))
    for value, expected in (("ring", None), ("wide", 1), ("narrow", 2)):
        counters.clear()
        monkeypatch.setenv(cuda_backend.BACKWARD_ENV, value)
        fused.backward(lambda *a, **kw: calls.append(kw) or 0, torch.randn(n_gates * H, H),
                       torch.randn(B, H) if cell == "lstm" else None, torch.randn(T, B, n_gates * H),
                       torch.randn(T, B, H), None, torch.randn(T, B, H), torch.randn(B, H),
                       torch.randn(B, H) if cell == "lstm" else None, None, False, cell=cell,
                       h0=torch.randn(B, H), h_all=torch.randn(T, B, H))
        assert calls[-1].get("tile") == expected, (value, calls[-1])
        # the counters are the one int32 tensor handed over
        (n_counters,) = [t.numel() for t in counters if t is not None and t.dtype == torch.int32 and t.dim() == 1
                         and t.numel() < B]
        assert n_counters == (3 if value == "narrow" else 2), (value, n_counters)
    assert w_rows == [32, 32, 32], w_rows


@pytest.mark.parametrize("dtype, cell, proj, served", [(torch.float16, "lstm", False, True),
                                                       (torch.bfloat16, "lstm", False, True),
                                                       (torch.float32, "lstm", False, False),
                                                       (torch.float16, "lstm", True, False),
                                                       (torch.float16, "gru", False, False)])
def test_fused_forward_hands_the_tagged_exchange_to_the_kernel(monkeypatch, dtype, cell, proj, served):
    """Under ``tagged``, fused.forward passes the kernel the tagged buffer (h0 packed into slot 1 under tag 0)
    and w_registers=1 for the 16-bit LSTM without projection, and no buffer elsewhere (the counter serves)."""
    from lstm_kernels.backends.cuda import fused

    calls = []

    class Stream:
        cuda_stream = 7

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setenv(cuda_backend.EXCHANGE_ENV, "tagged")
    packed = []
    pack = fused.pack_tagged
    monkeypatch.setattr(fused, "pack_tagged", lambda *a: packed.append(pack(*a)) or packed[-1])
    T, B, H, P = 2, 3, 10, (6 if proj else 10)
    n_gates = 4 if cell == "lstm" else 3
    h0 = torch.randn(B, P).to(dtype)
    fused.forward(lambda *a, **kw: calls.append(kw) or 0, torch.randn(T, B, n_gates * H).to(dtype),
                  torch.randn(n_gates * H, P).to(dtype), h0, torch.randn(B, H).to(dtype) if cell == "lstm" else None,
                  torch.randn(P, H).to(dtype) if proj else None, None, False, False, cell=cell)
    assert calls[-1].get("w_registers") == 1
    assert ("hx_tagged" in calls[-1]) == served and len(packed) == served
    if served:
        words = packed[0]
        assert words.shape == (2, 16, 16) and calls[-1]["hx_tagged"] == words.data_ptr()
        assert (words >> 32).eq(0).all(), "tag 0 everywhere before the first step"
        units = (words[1, :B] & 0xFFFF, (words[1, :B] >> 16) & 0xFFFF)  # word tagged_pos(p): units 2p, 2p + 1
        pos = fused.tagged_pos(torch.arange(5))
        got = torch.stack([units[0][:, pos], units[1][:, pos]], dim=-1).reshape(B, 10).to(torch.int16)
        assert torch.equal(got.view(dtype), h0)
        assert words[0].eq(0).all() and words[1, B:].eq(0).all() and words[1, :, fused.tagged_pos(torch.arange(5, 8))].eq(0).all()


def test_backend_reason_when_extension_missing(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_C", None)
    monkeypatch.setattr(cuda_ext, "build_info", lambda: None)
    assert get_backend("cuda").unavailable_reason() == cuda_backend.NOT_BUILT
    monkeypatch.setattr(cuda_ext, "build_info", lambda: {"cuda_extension": False, "reason": "no nvcc"})
    assert get_backend("cuda").unavailable_reason() == cuda_backend.NOT_BUILT + "; the build says: no nvcc"


def _call(**kw):
    base = dict(seq_len=4, batch=2, hidden_size=8, state_size=8, dtype=torch.float32, device=torch.device("cuda"),
                has_projection=False, variable_lengths=False, needs_grad=True)
    return RecurrenceCall(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, why",
    [
        (dict(device=torch.device("cpu")), "CUDA only"),
        (dict(dtype=torch.float64), "float64"),
        # served by the fused kernels only; float32 at H = 1024 does not fit sm_80's shared memory (the figure
        # used without a GPU)
        (dict(has_projection=True, state_size=4, hidden_size=1024), "proj_size"),
        (dict(variable_lengths=True, hidden_size=1024), "variable lengths"),
        (dict(seq_len=0), "empty"),
        (dict(batch=65535 * 16 + 1, hidden_size=1, state_size=1), "grid"),
    ],
)
def test_supports_declines(kw, why):
    reason = get_backend("cuda").supports(_call(**kw))
    assert reason is not None and why in reason


@pytest.mark.parametrize("kw", [dict(has_projection=True, state_size=4), dict(variable_lengths=True),
                                dict(variable_lengths=True, hidden_size=768, needs_grad=False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_supports_projection_and_variable_lengths_where_the_fused_kernels_fit(dtype, kw):
    assert get_backend("cuda").supports(_call(dtype=dtype, **kw)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_supports_accepts(dtype):
    assert get_backend("cuda").supports(_call(dtype=dtype)) is None
    spec = get_backend("cuda").workspace_spec(_call(dtype=dtype))
    assert spec == (((4, 2, 32), torch.float32), ((4, 2, 8), torch.float32))
    assert get_backend("cuda").workspace_spec(_call(dtype=dtype, needs_grad=False)) == ()


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, or the copy that ships in the triton wheel."""
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    import os

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


@needs_ext
def test_extension_kernels_are_built_for_sm80_and_sm90_without_spills():
    """The cubins in the extension (what the GPU will run): both architectures, every kernel
    of every dtype, and no kernel spills registers to local memory."""
    import re
    import subprocess

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel)")
    so = _C.__file__
    listing = subprocess.run([tool, "-lelf", so], capture_output=True, text=True, check=True).stdout
    archs = set(re.findall(r"\.(sm_\d+)\.cubin", listing))
    assert {"sm_80", "sm_90"} <= archs, listing
    usage = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    names = {name for name, *_ in kernels}
    # the per-step kernels: one instance per dtype, cell (LSTM, GRU), tensor-core switch and resets switch; the
    # fused kernels: one per Op (4), projection and resets switch, and the GRU's instances (no projection);
    # the forward's again with the register path for the three Ops that have one (not 3xTF32); the backward's
    # wide and narrow instances (no projection: the LSTM's and the GRU's, resets switch); the retired
    # cooperative kernels are gone
    for stem, count in (("forward_step_kernel", 24), ("backward_step_kernel", 24),
                        ("fused_forward_kernel", (16 + 8) + (12 + 6)),
                        ("fused_backward_kernel", 16 + 8 + 16 + 16), ("persistent_kernel", 0)):
        assert sum(stem in n for n in names) == count, f"{stem}: expected {count} instances in {sorted(names)}"
    spilling = [(name, stack, local) for name, _, stack, local in kernels if int(stack) or int(local)]
    assert not spilling, f"kernels spilling to local memory (stack frame or local): {spilling}"


@needs_ext
def test_tensor_core_instances_use_tensor_cores():
    """The tensor-core instantiations (template flag true) of every kernel and dtype hold HMMA
    instructions in their SASS (fp16/bf16 and tf32 products); the FMA ones hold none."""
    import re
    import subprocess

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel)")
    sass = subprocess.run([tool, "-sass", _C.__file__], capture_output=True, text=True, check=True).stdout
    hmma = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        if "_kernel" in name:
            hmma[name] = hmma.get(name, 0) + block.count("HMMA")
    # mangled template arguments: 13__nv_bfloat16 / 6__half / f, the cell's gates Li4 / Li3, then Lb1 (tensor
    # cores) or Lb0
    for dtype_tag in ("13__nv_bfloat16", "6__half", "f"):
        for kind in ("forward_step_kernel", "backward_step_kernel"):
            for cell in ("Li4E", "Li3E"):
                mma = [n for n in hmma if kind in n and f"I{dtype_tag}{cell}Lb1E" in n]
                fma = [n for n in hmma if kind in n and f"I{dtype_tag}{cell}Lb0E" in n]
                assert mma and fma, f"{kind} {dtype_tag} {cell}: instances not found in {sorted(hmma)}"
                assert all(hmma[n] > 0 for n in mma), f"{kind} {dtype_tag} {cell}: no HMMA in the tensor-core instance"
                assert all(hmma[n] == 0 for n in fma), f"{kind} {dtype_tag} {cell}: HMMA in the FMA instance"


def test_tensor_core_env(monkeypatch):
    monkeypatch.delenv(cuda_backend.MMA_ENV, raising=False)
    assert cuda_backend.tensor_cores_requested() is True
    monkeypatch.setenv(cuda_backend.MMA_ENV, "0")
    assert cuda_backend.tensor_cores_requested() is False
    monkeypatch.setenv(cuda_backend.MMA_ENV, "yes")
    with pytest.raises(ValueError, match="LSTM_KERNELS_CUDA_MMA"):
        cuda_backend.tensor_cores_requested()



def test_tensor_cores_for_float32_follow_torch_tf32_flag(monkeypatch, set_tf32):
    monkeypatch.delenv(cuda_backend.MMA_ENV, raising=False)
    set_tf32(False)
    assert not cuda_backend.use_tensor_cores(torch.float32)
    assert cuda_backend.use_tensor_cores(torch.bfloat16) and cuda_backend.use_tensor_cores(torch.float16)
    set_tf32(True)
    assert cuda_backend.use_tensor_cores(torch.float32)
    monkeypatch.setenv(cuda_backend.MMA_ENV, "0")
    assert not any(cuda_backend.use_tensor_cores(d) for d in (torch.float32, torch.bfloat16, torch.float16))


@needs_ext
def test_only_the_fused_kernels_carry_a_grid_barrier_on_every_architecture():
    """The time-bounded grid barrier (fused_common.cuh's grid_wait, LSTM_KERNELS_BARRIER_TIMEOUT) is compiled
    into every fused kernel for sm_80 and sm_90 (its poll sleeps: NANOSLEEP), and into no per-step kernel."""
    import re
    import subprocess

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel)")
    sass = subprocess.run([tool, "-sass", _C.__file__], capture_output=True, text=True, check=True).stdout
    sleeps = {}  # (arch, kernel) -> NANOSLEEP count
    for section in re.split(r"Fatbin \w+ code:", sass)[1:]:
        arch = re.search(r"arch = (sm_\d+)", section)
        if arch is None:
            continue
        for block in re.split(r"\n\s*Function : ", section)[1:]:
            name = block.split("\n", 1)[0].strip()
            if "_kernel" in name:
                sleeps[(arch.group(1), name)] = block.count("NANOSLEEP")
    for arch in ("sm_80", "sm_90"):
        fused = [n for (a, n) in sleeps if a == arch and re.search(r"fused_(forward|backward)_kernel", n)]
        step = [n for (a, n) in sleeps if a == arch and re.search(r"(forward|backward)_step_kernel", n)]
        # the fused kernels: 32 of the LSTM's, 16 of the GRU's, the forward's 18 with the register path (12 of the
        # LSTM's, 6 of the GRU's), 16 wide and 16 narrow backward ones; the per-step kernels: 48
        assert len(fused) == 32 + 16 + 18 + 16 + 16 and len(step) == 48, (
            arch, sorted(n for a, n in sleeps if a == arch))
        assert len(fused) + len(step) == sum(a == arch for a, _ in sleeps), (arch, sorted(sleeps))
        assert all(sleeps[(arch, n)] > 0 for n in fused), f"{arch}: a fused kernel lacks the bounded grid barrier"
        assert all(sleeps[(arch, n)] == 0 for n in step), f"{arch}: a per-step kernel holds a grid barrier"
