"""The triton backend's recurrence against the reference backend, both variants: "step" (the
per-step kernels) and "persistent" (the persistent kernels, in their steps mode under the
interpreter; tests/triton/test_triton_persistent_budget.py tests them at their own tiles).

Runs on the CPU under TRITON_INTERPRET=1 (small shapes: the interpreter is slow) and
on a GPU as is. Forward outputs h_all, h_T, c_T and backward outputs dG, dh0, dc0 are
compared with the reference backend run in float64 on the same (rounded) inputs, and
dW_hr with a projection.
"""
from __future__ import annotations

import pytest
import torch

from lstm_kernels.backends import RecurrenceCall, get_backend, known_backends
import recurrence_cases
from recurrence_cases import run
from utils import REL_TOL, assert_rel_close

known_backends()  # load the built-in backends first: importing the triton module alone would register only it
triton_backend = pytest.importorskip("lstm_kernels.backends.triton")
kernels = pytest.importorskip("lstm_kernels.backends.triton.config")

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.interpreting() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ["step", "persistent"]


def make_case(T, B, H, dtype, seed=0, lengths=None, proj=0):
    return recurrence_cases.make_case(T, B, H, dtype, DEVICE, seed=seed, lengths=lengths, proj=proj)


def check_against_reference(variant, case, dtype, tol=None):
    actual, ws = run(triton_backend.TritonBackend(variant), case)
    expected, _ = run(get_backend("reference"), case, torch.float64)
    tol = REL_TOL[dtype] if tol is None else tol
    for name, e in expected.items():
        a = actual[name]
        assert a.dtype == dtype, f"{name} dtype {a.dtype} != {dtype}"
        assert a.device.type == DEVICE
        assert_rel_close(a, e, tol, name)
    return actual, ws


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("H", [1, 13, 16, 33])
def test_matches_reference(H, B, T, dtype, variant):
    check_against_reference(variant, make_case(T, B, H, dtype), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("B", [1, 17])
@pytest.mark.parametrize("H,P", [(13, 5), (6, 20), (33, 16), (1, 1)], ids=["H13_P5", "H6_P20", "H33_P16", "H1_P1"])
def test_projection_matches_reference(H, P, B, T, dtype, variant):
    check_against_reference(variant, make_case(T, B, H, dtype, proj=P), dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("proj", [0, 7], ids=["no_proj", "proj7"])
@pytest.mark.parametrize(
    "T,lengths", [(5, [5, 3, 1]), (4, [4, 4, 2, 2, 1]), (6, [6, 5, 5, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])],
    ids=["B3", "B5_ties", "B17"],
)
def test_variable_lengths_match_reference(T, lengths, proj, dtype, variant):
    case = make_case(T, len(lengths), 13, dtype, lengths=lengths, proj=proj)
    actual, _ = check_against_reference(variant, case, dtype)
    for b, n in enumerate(lengths):  # padding steps hold zeros, as PackedSequence's padding does
        assert (actual["h_all"][n:, b] == 0).all()
        assert (actual["dG"][n:, b] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic_and_the_variants_agree(variant):
    """Run after run, bitwise the same. The variants compute the same math, but the persistent
    kernels sum K in slices over warps where the step ones sum BLOCK_K chunks, so across
    variants the results only agree closely."""
    case = make_case(5, 17, 33, torch.float32, seed=3, proj=20)
    first, _ = run(triton_backend.TritonBackend(variant), case)
    again, _ = run(triton_backend.TritonBackend(variant), case)
    other, _ = run(triton_backend.TritonBackend("step" if variant == "persistent" else "persistent"), case)
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name} differs between two runs"
        assert_rel_close(first[name], other[name], 1e-6, f"{name}, step vs persistent")


def _small_blocks(hidden, batch, dtype):
    """16-wide blocks: under the interpreter the default blocks cover these shapes in one tile."""
    return dict(BLOCK_B=16, BLOCK_H=16, BLOCK_K=16, num_warps=4)


@pytest.mark.parametrize("proj", [0, 20], ids=["no_proj", "proj20"])
@pytest.mark.parametrize("lengths", [None, [5, 5, 4] + [3] * 14 + [1] * 16], ids=["dense", "packed"])
def test_many_tiles_match_reference(lengths, proj, monkeypatch):
    """The step kernels with several tiles along B and H (and P): the tile arithmetic and the tail
    masks (the persistent kernels' several tiles: test_triton_persistent_budget.py)."""
    for module in ("step_forward", "step_backward"):
        monkeypatch.setattr(f"lstm_kernels.backends.triton.{module}.step_config", _small_blocks)
    B = 33 if lengths is None else len(lengths)
    case = make_case(5, B, 35, torch.float32, seed=4, lengths=lengths, proj=proj)
    check_against_reference("step", case, torch.float32)


@pytest.mark.parametrize("proj", [0, 4], ids=["no_proj", "proj4"])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_workspace_matches_its_spec(needs_grad, proj):
    case = make_case(3, 2, 13, torch.float32, proj=proj)
    backend = triton_backend.TritonBackend()
    args = (case["xg"], case["w_hh"], case["h0"], case["c0"], case["w_hr"], None)
    h_all, h_T, c_T, ws = backend.forward(*args, needs_grad)
    spec = backend.workspace_spec(RecurrenceCall.of(case["xg"], case["w_hh"], case["w_hr"], None, needs_grad))
    assert [(tuple(w.shape), w.dtype) for w in ws] == [(tuple(s), d) for s, d in spec]
    expected = get_backend("reference").forward(*args, needs_grad)
    for a, e, name in zip((h_all, h_T, c_T), expected[:3], ("h_all", "h_T", "c_T")):
        assert_rel_close(a, e, REL_TOL[torch.float32], name)


def test_non_contiguous_inputs():
    """Slices of wider tensors are served (the launch helpers make them contiguous)."""
    case = make_case(4, 3, 13, torch.float32)
    wide = {n: torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]]
            for n, t in case.items() if t is not None}
    assert not wide["xg"].is_contiguous()
    wide["batch_sizes"] = wide["w_hr"] = None
    check_against_reference("step", wide, torch.float32)


def _call(**overrides):
    fields = dict(seq_len=3, batch=2, hidden_size=4, state_size=4, dtype=torch.float32,
                  device=torch.device(DEVICE), has_projection=False, variable_lengths=False, needs_grad=True)
    fields.update(overrides)
    return RecurrenceCall(**fields)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(dtype=torch.float64), "float64"),
        (dict(seq_len=0), "empty"),
        (dict(seq_len=2**20, batch=2**10, hidden_size=2**10), "too large"),
        (dict(hidden_size=2**14, state_size=2**15, has_projection=True), "too large"),  # 4H * P
        (dict(device=torch.device("meta")), "meta"),
    ],
    ids=["float64", "empty", "too_large", "too_large_weights", "wrong_device"],
)
def test_supports_declines_with_a_reason(overrides, match):
    why = triton_backend.TritonBackend().supports(_call(**overrides))
    assert why is not None and match in why


def test_supports_serves_the_plain_case():
    assert triton_backend.TritonBackend().supports(_call()) is None
    assert triton_backend.TritonBackend().supports(_call(variable_lengths=True, dtype=torch.bfloat16)) is None
    assert triton_backend.TritonBackend().supports(_call(has_projection=True, state_size=2)) is None


def test_step_config_blocks_are_at_least_16():
    for H in (1, 13, 16, 33, 129, 1024):
        for B in (1, 3, 17, 256):
            cfg = kernels.step_config(H, B, torch.bfloat16)
            assert all(cfg[k] >= 16 for k in ("BLOCK_B", "BLOCK_H", "BLOCK_K"))
