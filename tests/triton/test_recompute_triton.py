"""Recompute mode on the triton backend (float32; under TRITON_INTERPRET=1 on the CPU): outputs and
gradients bitwise the normal mode's, both variants; the workspace memory it saves; the 16-bit rule.

The helpers and the reference-backend tests are in tests/test_recompute.py.
"""
from __future__ import annotations

import os

import pytest
import torch

import test_recompute as rc  # tests/ is on sys.path (conftest); imported as a module so that pytest
                             # does not collect its reference-backend tests here
from lstm_kernels import BackendUnsupportedError, lstm_layer
from lstm_kernels.recompute import recompute_layer

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1",
    reason="the CPU tests of the triton backend need TRITON_INTERPRET=1",
)


@pytest.mark.parametrize("variant", ["step", "persistent"])
@pytest.mark.parametrize("segment", [True, 1, 5], ids=["k=True", "k=1", "k=5"])
@pytest.mark.parametrize("kind", ["dense", "packed_unsorted", "packed_sorted"])
@pytest.mark.parametrize("config_name", ["plain", "proj_bidir_2l", "dropout_3l"])
def test_bitwise_equal_to_normal_mode(config_name, kind, segment, variant, monkeypatch):
    monkeypatch.setenv("LSTM_KERNELS_TRITON_VARIANT", variant)
    config = rc.CONFIGS[config_name]
    _, normal, recompute = rc._pair(config, "triton", segment, torch.float32)
    gen = torch.Generator().manual_seed(11)
    x, module_input, B = rc._module_input(kind, config, torch.float32, gen)
    hx = rc._state(config, B, kind, torch.float32, gen)
    expected = rc._results(normal, x, module_input, hx)
    actual = rc._results(recompute, x, module_input, hx)
    rc._assert_same_as_normal(actual, expected, rc._segments(kind, segment), torch.float32)


@pytest.mark.parametrize("packed", [False, True])
def test_recompute_keeps_less_than_the_normal_mode(packed):
    rc.check_keeps_less_than_the_normal_mode("triton", packed, T_=36, B=2, H=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_with_segments_raises_and_one_segment_is_served(dtype):
    gen = torch.Generator().manual_seed(12)
    B, H = 2, 4
    args = [torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)
            for shape in ((rc.T, B, 4 * H), (4 * H, H), (B, H), (B, H))]
    with pytest.raises(BackendUnsupportedError, match="'triton'.*float32"):
        recompute_layer(*args, backend="triton", segment=3)
    expected = lstm_layer(*args, backend="triton")
    grads_expected = torch.autograd.grad(sum(t.float().sum() for t in expected), args)
    actual = recompute_layer(*args, backend="triton", segment=rc.T)
    grads_actual = torch.autograd.grad(sum(t.float().sum() for t in actual), args)
    for a, e in zip((*actual, *grads_actual), (*expected, *grads_expected)):
        assert torch.equal(a, e)
