"""The measured choice (lstm_kernels/autotune.py), proven on the CPU.

On a GPU several paths serve a call: the fused backends and torch's own kernel. These tests make
the CPU look like that (fake kernel backends that serve and verify on the CPU, and torch's CPU
kernel as a candidate rather than taken outright) and inject the timings, so that what is checked
is the mechanism: the faster candidate wins and serves, a choice is kept per bucket in the process
and on disk (across processes), ``LSTM_KERNELS_AUTOTUNE=0`` gives the fixed order, timing leaves
the user's gradients and random stream alone, and path_for says what was chosen and why.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fake_backends
import lstm_kernels.module as module_mod
from lstm_kernels import FusedLSTM, autotune, verification
from lstm_kernels.backends import native
from lstm_kernels.backends import dispatch
from utils import assert_rel_close

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def gpu_like(monkeypatch, tmp_path):
    """Candidates "right" (a fake kernel) and "native"; returns the timings to inject, per path,
    and the list of timed paths."""
    monkeypatch.setenv(verification.VERIFY_ENV, "1")
    monkeypatch.setenv(verification.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    verification.clear()
    autotune.clear()
    fakes = fake_backends.install()
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("right", "reference"))
    monkeypatch.setattr(native, "taken_outright", lambda x: False)
    timings = {"right": 1.0, "native": 2.0}
    timed = []

    def timer(path, run, device):
        run()  # the candidate runs, as it would be timed
        timed.append(path)
        return timings[path]

    monkeypatch.setattr(autotune, "timer", timer)
    yield dict(timings=timings, timed=timed, fakes=fakes)
    fake_backends.uninstall()
    verification.clear()
    autotune.clear()


def _served(monkeypatch):
    """The paths forward runs, recorded."""
    paths = []
    original = module_mod.FusedLSTM._forward_on

    def spy(self, path, *args):
        paths.append(path)
        return original(self, path, *args)

    monkeypatch.setattr(module_mod.FusedLSTM, "_forward_on", spy)
    return paths


@pytest.mark.parametrize("fastest", ["right", "native"])
def test_the_faster_candidate_is_chosen_and_serves(gpu_like, monkeypatch, fastest):
    gpu_like["timings"][fastest] = 0.5
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, num_layers=2)
    fused = FusedLSTM.from_torch(lstm)
    x = torch.randn(7, 3, 4)
    served = _served(monkeypatch)
    out, (h, c) = fused(x)
    assert sorted(gpu_like["timed"]) == ["native", "right"]
    assert served[-1] == fastest  # after the timing runs, the call itself
    assert_rel_close(out, lstm(x)[0], 1e-5, "output")
    choice = fused.path_for(x, explain=True)
    assert choice.path == fastest and "fastest measured" in choice.reason and f"{fastest} 0.5 ms" in choice.reason
    assert fused.path_for(x) == fastest
    assert len(gpu_like["timed"]) == 2  # path_for used the known choice


def test_one_measurement_per_bucket_not_per_length(gpu_like):
    fused = FusedLSTM(4, 6)
    for T, B in ((7, 5), (3, 7), (11, 8), (7, 5)):  # batches 5, 7 and 8 share the bucket 8
        fused(torch.randn(T, B, 4))
    assert len(gpu_like["timed"]) == 2
    fused(torch.randn(7, 9, 4))  # bucket 16
    assert len(gpu_like["timed"]) == 4
    with torch.no_grad():  # inference is a bucket of its own (other kernels, forward only)
        fused(torch.randn(7, 9, 4))
    assert len(gpu_like["timed"]) == 6


def test_the_fixed_order_without_autotune(gpu_like, monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    gpu_like["timings"]["native"] = 0.1
    fused = FusedLSTM(4, 6)
    choice = fused.path_for(torch.randn(5, 3, 4), explain=True)
    assert choice.path == "right" and autotune.AUTOTUNE_ENV in choice.reason
    fused(torch.randn(5, 3, 4))
    assert gpu_like["timed"] == []


def test_a_kernel_that_fails_verification_is_no_candidate(gpu_like, monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("wrong", "reference"))
    fused = FusedLSTM(4, 6)
    with pytest.warns(RuntimeWarning, match="failed verification"):
        choice = fused.path_for(torch.randn(5, 3, 4), explain=True)
    assert choice.path == "native" and gpu_like["timed"] == []


def test_timing_leaves_gradients_and_the_random_stream_alone(gpu_like, monkeypatch):
    fused = FusedLSTM(4, 6, num_layers=2)
    x = torch.randn(5, 3, 4, requires_grad=True)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    torch.manual_seed(3)
    fused(x)
    expected_draw = torch.rand(4)
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    torch.manual_seed(3)
    out, _ = fused(x)  # measures first: forward and backward of both candidates
    assert len(gpu_like["timed"]) == 2
    assert torch.equal(torch.rand(4), expected_draw)
    assert x.grad is None and all(p.grad is None for p in fused.parameters())
    out.sum().backward()
    assert x.grad is not None


def test_packed_input_is_measured_on_its_own_prefix(gpu_like, monkeypatch):
    monkeypatch.setattr(autotune, "TIMED_STEPS", 3)
    lstm = nn.LSTM(4, 6, bidirectional=True)
    fused = FusedLSTM.from_torch(lstm)
    packed = pack_padded_sequence(torch.randn(6, 3, 4), torch.tensor([6, 2, 4]), enforce_sorted=False)
    out, (h, _) = fused(packed)
    expected, (expected_h, _) = lstm(packed)
    assert len(gpu_like["timed"]) == 2
    assert_rel_close(out.data, expected.data, 1e-5, "output")
    assert_rel_close(h, expected_h, 1e-5, "h_n")


def test_a_choice_is_written_to_the_cache_file(gpu_like):
    FusedLSTM(4, 6)(torch.randn(5, 3, 4))
    data = json.loads((verification.cache_dir() / autotune.CACHE_FILE).read_text())
    (entry,) = data.values()
    ((key, (path, times)),) = entry["entries"].items()
    assert path == "right" and times == {"right": 1.0, "native": 2.0}
    assert json.loads(key)["batch_bucket"] == 4
    autotune.clear()  # a new process, as far as choices go: the file answers
    FusedLSTM(4, 6)(torch.randn(5, 3, 4))
    assert len(gpu_like["timed"]) == 2


def test_choices_carry_across_processes(tmp_path):
    """A choice measured by one process is taken by the next, which does not time again."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch, fake_backends
        from lstm_kernels import FusedLSTM, autotune
        from lstm_kernels.backends import native
        from lstm_kernels.backends import dispatch
        fake_backends.install()
        dispatch.AUTO_ORDER = ("right", "reference")
        native.taken_outright = lambda x: False
        timed = []
        autotune.timer = lambda path, run, device: timed.append(path) or {{"right": 3.0, "native": 1.0}}[path]
        fused = FusedLSTM(4, 6)
        print("PATH", fused.path_for(torch.randn(5, 3, 4)), "TIMED", len(timed))
    """)
    env = {**__import__("os").environ, verification.CACHE_DIR_ENV: str(tmp_path), verification.VERIFY_ENV: "1"}
    env.pop(autotune.AUTOTUNE_ENV, None)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
            for _ in range(2)]
    assert "PATH native TIMED 2" in runs[0].stdout, runs[0].stderr
    assert "PATH native TIMED 0" in runs[1].stdout, runs[1].stderr


def test_compile_takes_the_measured_path(gpu_like):
    """While dynamo traces nothing is timed; the path measured at every batch of the sizes is taken."""
    gpu_like["timings"]["native"] = 0.5
    fused = FusedLSTM(4, 6)
    x = torch.randn(5, 3, 4)
    expected = fused(x)[0]
    assert len(gpu_like["timed"]) == 2
    torch._dynamo.reset()
    code = []

    def backend(gm, inputs):
        code.append(gm.code)
        return gm.forward

    out = torch.compile(fused, fullgraph=True, backend=backend)(x)[0]
    assert len(gpu_like["timed"]) == 2
    assert "native_lstm" in code[0] and "recurrence" not in code[0]
    assert_rel_close(out, expected, 1e-6, "output")


def test_compile_without_a_measurement_takes_the_fixed_order(gpu_like):
    torch._dynamo.reset()
    code = []

    def backend(gm, inputs):
        code.append(gm.code)
        return gm.forward

    torch.compile(FusedLSTM(4, 6), fullgraph=True, backend=backend)(torch.randn(5, 3, 4))
    assert gpu_like["timed"] == []
    assert "recurrence" in code[0] and "native_lstm" not in code[0]


def test_batch_buckets():
    assert [autotune.batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
