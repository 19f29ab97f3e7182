"""Verification before first use (lstm_kernels/verification.py), proven on the CPU with fake backends
that ask for it (tests/fake_backends.py): a wrong kernel is caught, warned about once, and ``auto``
falls back while a named backend raises; verdicts are cached per plan (batch and gradient mode included), in the process and on disk,
under a key that changes with the package version and the kernel sources; a failing launch fails
its verification; nothing is verified during CUDA graph capture or with LSTM_KERNELS_VERIFY=0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fake_backends
from lstm_kernels import BackendUnsupportedError, lstm_layer, verification
from lstm_kernels import backends as backends_mod
from lstm_kernels.backends import dispatch
from lstm_kernels.backends import RecurrenceCall
from utils import REL_TOL, assert_rel_close

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    monkeypatch.setenv(verification.VERIFY_ENV, "1")
    monkeypatch.setenv(verification.CACHE_DIR_ENV, str(tmp_path / "cache"))
    verification.clear()
    installed = fake_backends.install()
    yield installed
    fake_backends.uninstall()
    verification.clear()


def _inputs(T=4, B=3, H=5, seed=0, requires_grad=True):
    """lstm_layer's (xg, w_hh, h0, c0); requiring gradients (a training call) unless told otherwise."""
    gen = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(T, B, 4 * H, generator=gen), torch.randn(4 * H, H, generator=gen) / H**0.5,
               torch.randn(B, H, generator=gen), torch.randn(B, H, generator=gen))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def _call(B=3, H=5, device="cpu", cell="lstm"):
    return RecurrenceCall(seq_len=4, batch=B, hidden_size=H, state_size=H, dtype=torch.float32,
                          device=torch.device(device), has_projection=False, variable_lengths=False, needs_grad=True,
                          cell=cell)


def test_the_gru_is_verified_as_the_gru(fakes):
    """A GRU call is verified on the GRU's inputs and outputs, its d_hn included: a backend right for
    the LSTM and wrong in the GRU's backward passes the one and fails the other."""
    assert verification.verify(fakes["wrong_gru"], _call()).ok
    verdict = verification.verify(fakes["wrong_gru"], _call(cell="gru"))
    assert not verdict.ok and "d_hn" in verdict.detail, verdict
    right = verification.verify(fakes["right"], _call(cell="gru"))
    assert right.ok and right.detail.startswith("h and every gradient"), right
    assert verification.plan_key(fakes["right"], _call(cell="gru")) != verification.plan_key(fakes["right"], _call())


def test_a_wrong_kernel_is_caught_warned_about_once_and_auto_falls_back(fakes, monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("wrong", "reference"))
    args = _inputs()
    with pytest.warns(RuntimeWarning, match="'wrong' backend failed verification.*largest error") as record:
        h_all, _, _ = lstm_layer(*args, backend="auto")
    assert len([w for w in record if "failed verification" in str(w.message)]) == 1
    assert_rel_close(h_all, lstm_layer(*args, backend="reference")[0], REL_TOL[torch.float32], "h_all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call of the same plan: no second warning
        lstm_layer(*args, backend="auto")
    assert fakes["wrong"].forward_calls == 1  # only verification ran it


def test_a_named_backend_that_fails_verification_raises(fakes):
    with pytest.warns(RuntimeWarning), pytest.raises(BackendUnsupportedError, match="failed verification"):
        lstm_layer(*_inputs(), backend="wrong")


def test_a_launch_that_raises_fails_verification(fakes, monkeypatch):
    """A kernel that raises (here: a grid barrier that gave up) is a failed plan, not a crash of the call."""
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("raising", "reference"))
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: triton forward: grid barrier"):
        lstm_layer(*_inputs(), backend="auto")


def test_a_plan_is_verified_once_and_remembered_on_disk(fakes, monkeypatch):
    runs = []
    original = verification.verify
    monkeypatch.setattr(verification, "verify", lambda *a, **k: runs.append(a[1].batch) or original(*a, **k))
    for B in (5, 5, 7):  # the kernels' tiles follow the exact batch: one verification per B
        lstm_layer(*_inputs(B=B), backend="right")
    assert runs == [5, 7]
    with torch.no_grad():  # inference compiles other kernels: its own verification
        lstm_layer(*_inputs(B=5), backend="right")
    assert runs == [5, 7, 5]
    verification.clear()  # a new process, as far as verdicts go: the cache file answers
    lstm_layer(*_inputs(B=7), backend="right")
    assert runs == [5, 7, 5]
    data = json.loads((verification.cache_dir() / verification.CACHE_FILE).read_text())
    (entry,) = data.values()
    assert entry["environment"]["package"] == verification.environment()["package"]
    keys = sorted((json.loads(k)["batch"], json.loads(k)["needs_grad"]) for k in entry["entries"])
    assert keys == [(5, False), (5, True), (7, True)]
    assert all(v[0] is True for v in entry["entries"].values())


def test_inference_kernels_are_verified_as_inference(fakes, monkeypatch):
    """A kernel wrong only without gradients (an inference binary of its own) is caught under no_grad."""
    original = fakes["right"].forward

    def forward(xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad):
        h_all, h_T, c_T, ws = original(xg, w_hh, h0, c0, w_hr, batch_sizes, needs_grad)
        return (h_all, h_T, c_T, ws) if needs_grad else (h_all * 1.01, h_T, c_T, ws)

    monkeypatch.setattr(fakes["right"], "forward", forward)
    lstm_layer(*_inputs(), backend="right")  # training: verified and served
    with torch.no_grad(), pytest.warns(RuntimeWarning), pytest.raises(BackendUnsupportedError):
        lstm_layer(*_inputs(), backend="right")


def test_a_failed_launch_is_remembered_in_this_process_only(fakes, monkeypatch):
    """An exception may be transient (out of memory, a refused launch): it is not written to disk."""
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("raising", "reference"))
    with pytest.warns(RuntimeWarning):
        lstm_layer(*_inputs(), backend="auto")
    assert not (verification.cache_dir() / verification.CACHE_FILE).exists()
    lstm_layer(*_inputs(), backend="auto")  # remembered here: no second verification
    assert fakes["raising"].forward_calls == 1


def test_an_exception_without_a_message_fails_verification_cleanly(fakes, monkeypatch):
    def forward(*args):
        raise RuntimeError()

    monkeypatch.setattr(fakes["raising"], "forward", forward)
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("raising", "reference"))
    with pytest.warns(RuntimeWarning, match="raised RuntimeError"):
        lstm_layer(*_inputs(), backend="auto")


@pytest.mark.parametrize("content", ["[]", "{", '{"x": 3}', '{"KEY": {"entries": []}}', '{"KEY": {"entries": {"p": 1}}}'])
def test_a_malformed_cache_file_is_ignored(fakes, content):
    path = verification.cache_dir() / verification.CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("KEY", verification.environment_key()))
    lstm_layer(*_inputs(), backend="right")  # verifies, and writes a good file
    verification.clear()
    lstm_layer(*_inputs(), backend="right")
    assert json.loads(path.read_text())[verification.environment_key()]["entries"]


def test_cache_key_changes_with_package_version_and_kernel_sources():
    env = verification.environment(package_version="0.1.0", kernels="aaaa")
    key = verification.environment_key(env)
    assert verification.environment_key(dict(env)) == key
    assert verification.environment_key(verification.environment(package_version="0.2.0", kernels="aaaa")) != key
    assert verification.environment_key(verification.environment(package_version="0.1.0", kernels="bbbb")) != key
    assert len(verification.kernel_source_hash()) == 16


@pytest.mark.parametrize("where", ["backends/reference.py", "backends/cuda/fused.py", "backends/triton/config.py",
                                   "verification.py", "_C.so"])
def test_kernel_sources_hash_covers_the_backends_subpackages(tmp_path, where):
    """A saved verdict holds only for the sources it was given under: a change to any backend's Python (the
    cuda and triton subpackages' plans and kernels too), the extension or the verifier changes the hash."""
    import lstm_kernels

    package = Path(lstm_kernels.__file__).resolve().parent
    for rel in ("backends/__init__.py", "backends/reference.py", "backends/cuda/fused.py", "backends/triton/config.py",
                "verification.py", "tolerances.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((package / rel).read_bytes())
    (tmp_path / "_C.so").write_bytes(b"extension")
    before = verification.sources_hash(tmp_path)
    assert verification.sources_hash(tmp_path) == before
    with open(tmp_path / where, "ab") as f:
        f.write(b"\n# changed\n")
    assert verification.sources_hash(tmp_path) != before, where
    assert verification.sources_hash(package) == verification.kernel_source_hash()


def test_plan_key_names_the_plan():
    key = json.loads(verification.plan_key(backends_mod.get_backend("reference"), _call(B=5)))
    assert key == dict(backend="reference", plan=[], dtype="float32", tf32=False, H=5, P=5, projection=False,
                       variable_lengths=False, batch=5, needs_grad=True, device="cpu")


def test_verification_off_lets_the_backend_serve(fakes, monkeypatch):
    monkeypatch.setenv(verification.VERIFY_ENV, "0")
    h_all, _, _ = lstm_layer(*_inputs(), backend="wrong")  # served, wrong as it is
    assert not torch.allclose(h_all, lstm_layer(*_inputs(), backend="reference")[0])


def test_nothing_is_verified_during_cuda_graph_capture(fakes, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(verification, "device_description", lambda device: "a GPU sm_90")
    with pytest.raises(RuntimeError, match="run the model once eagerly before capturing"):
        verification.failure(fakes["right"], _call(device="cuda"))


def test_the_compiled_op_verifies_at_its_first_run(fakes):
    """Dispatch does not verify while dynamo traces; the op's implementation does, and raises."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: lstm_layer(*a, backend="wrong"), fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning), pytest.raises(BackendUnsupportedError, match="compiled graph cannot switch"):
        compiled(*_inputs())


def test_compile_consults_known_verdicts(fakes, monkeypatch):
    """A plan known to fail (here: from an eager call) is skipped while dynamo traces ``auto``."""
    monkeypatch.setattr(dispatch, "AUTO_ORDER", ("wrong", "reference"))
    args = _inputs()
    with pytest.warns(RuntimeWarning, match="failed verification"):
        lstm_layer(*args, backend="auto")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: lstm_layer(*a, backend="auto"), fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h_all, _, _ = compiled(*args)
    assert fakes["wrong"].forward_calls == 1  # its verification only
    assert torch.equal(h_all, lstm_layer(*args, backend="reference")[0])


def test_verdicts_carry_across_processes(tmp_path):
    """A verdict written by one process is read by the next, which does not verify again."""
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(TESTS)!r})
        import torch, fake_backends
        from lstm_kernels import lstm_layer, verification
        fakes = fake_backends.install()
        runs = []
        original = verification.verify
        verification.verify = lambda *a, **k: runs.append(1) or original(*a, **k)
        x = torch.randn(4, 3, 20), torch.randn(20, 5), torch.randn(3, 5), torch.randn(3, 5)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            lstm_layer(*x, backend="right")
            try:
                lstm_layer(*x, backend="wrong")
            except Exception as error:
                print("WRONG", type(error).__name__)
        print("RUNS", len(runs))
    """)
    env = {**os.environ, verification.VERIFY_ENV: "1", verification.CACHE_DIR_ENV: str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), env.get("PYTHONPATH")]))
    outputs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outputs.append(proc.stdout)
    assert "RUNS 2" in outputs[0] and "WRONG BackendUnsupportedError" in outputs[0]
    assert "RUNS 0" in outputs[1] and "WRONG BackendUnsupportedError" in outputs[1]
