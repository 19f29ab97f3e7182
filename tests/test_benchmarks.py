"""The benchmark suite (benchmarks/) on tiny CPU configs: files, columns, speedups, filters, skips, statistics.

No assertion here is about speed; the sweeps are tiny so the file runs in seconds.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import configs as cfgs  # noqa: E402
from benchmarks import providers, report, runner, timing  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from lstm_kernels import BackendUnsupportedError  # noqa: E402
from utils import assert_rel_close  # noqa: E402

REQUIRED_COLUMNS = [
    "device", "dtype", "T", "B", "H", "I", "layers", "bidirectional", "impl", "pass",
    "median_ms", "p10_ms", "p90_ms", "peak_mem_mb", "speedup_vs_cudnn",
]  # fmt: skip
TINY = ["--device", "cpu", "--B", "2", "--H", "8", "--reps", "3", "--max-reps", "5", "--warmup", "1", "--no-progress"]


def run_cli(out: Path, *extra: str) -> list[dict]:
    assert main([*TINY, "--out", str(out), *extra]) == 0
    return report.read_csv(out / report.CSV_NAME)[1]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main([*TINY, "--T", "4,8", "--case", "single", "--out", str(out)]) == 0
    header, rows = report.read_csv(out / report.CSV_NAME)
    return out, header, rows


# ---- the CLI end to end --------------------------------------------------------------


def test_csv_columns_and_rows(tiny_sweep):
    _, _, rows = tiny_sweep
    assert list(rows[0])[: len(REQUIRED_COLUMNS)] == REQUIRED_COLUMNS
    assert "cudnn_persistent_eligible" in rows[0]
    # 2 T x 1 B x 1 H x 4 impls (CPU default: nn.LSTM, fused-auto, fused-reference, fused-auto-recompute) x 2 passes
    assert len(rows) == 16
    keys = {(r["impl"], r["pass"], r["T"]) for r in rows}
    impls = ("nn.LSTM", "fused-auto", "fused-reference", "fused-auto-recompute")
    assert keys == {(i, p, t) for i in impls for p in ("fwd", "fwd_bwd") for t in ("4", "8")}
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["dtype"], r["B"], r["H"], r["I"], r["layers"], r["bidirectional"]) == ("fp32", "2", "8", "8", "1", "False")
        p10, med, p90 = float(r["p10_ms"]), float(r["median_ms"]), float(r["p90_ms"])
        assert 0 < p10 <= med <= p90
        assert int(r["reps"]) >= 3
        assert r["peak_mem_mb"] == ""  # CPU: not measured
        if r["pass"] == "fwd_bwd":
            assert float(r["saved_mb"]) > 0
        else:
            assert r["saved_mb"] == ""  # nothing is saved under no_grad
        assert float(r["per_step_us"]) == pytest.approx(med * 1e3 / int(r["T"]), rel=1e-4)


def test_speedup_is_against_nn_lstm_of_the_same_config(tiny_sweep):
    """On the CPU against nn.LSTM timed interleaved with the row (paired_baseline_ms), else the nn.LSTM row."""
    _, _, rows = tiny_sweep
    base = {(r["T"], r["pass"]): float(r["median_ms"]) for r in rows if r["impl"] == "nn.LSTM"}
    for r in rows:
        if r["impl"] == "nn.LSTM":
            assert r["paired_baseline_ms"] == ""
            assert float(r["speedup_vs_cudnn"]) == pytest.approx(1.0)
            continue
        paired = float(r["paired_baseline_ms"])
        assert paired > 0
        assert float(r["speedup_vs_cudnn"]) == pytest.approx(paired / float(r["median_ms"]), rel=1e-4)
    unpaired = [dict(r, paired_baseline_ms="") for r in rows]
    report.add_speedups(unpaired)
    for r in unpaired:
        expected = base[(r["T"], r["pass"])] / float(r["median_ms"])
        assert float(r["speedup_vs_cudnn"]) == pytest.approx(expected, rel=1e-4)


def test_keep_cpu_allocations_sets_glibc_thresholds():
    import ctypes

    from benchmarks.timing import keep_cpu_allocations

    try:
        ctypes.CDLL(None).mallopt
    except AttributeError:
        pytest.skip("malloc is not glibc's")
    assert "M_MMAP_THRESHOLD 32 MiB" in keep_cpu_allocations()


def test_time_paired_interleaves_in_alternating_order():
    from benchmarks.timing import time_paired

    calls = []
    times, base_times = time_paired(lambda i: calls.append(("run", i)), lambda i: calls.append(("base", i)), 4,
                                    start_index=10)
    assert len(times) == len(base_times) == 4
    assert calls == [("run", 10), ("base", 10), ("base", 11), ("run", 11),
                     ("run", 12), ("base", 12), ("base", 13), ("run", 13)]


def test_header_in_every_file(tiny_sweep):
    out, header, _ = tiny_sweep
    text = "\n".join(header)
    for key in ("device:", "driver:", "torch", "triton", "CUDA", "commit", "cpu_allocator:"):
        assert key in text
    assert header[0].startswith("device: CPU")
    md = (out / report.MD_NAME).read_text().splitlines()
    assert md[0].startswith("# LSTM benchmarks")
    assert any("torch" in line and "triton" in line and "commit" in line for line in md[:5])
    assert "Per-step latency" in "\n".join(md)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["speedup_fp32.png", "time_vs_T_fp32.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_filters(tmp_path):
    rows = run_cli(tmp_path, "--T", "4", "--pass", "fwd", "--impl", "nn.LSTM", "--case", "bidir", "--no-plots")
    assert len(rows) == 1
    r = rows[0]
    assert (r["T"], r["pass"], r["impl"], r["layers"], r["bidirectional"]) == ("4", "fwd", "nn.LSTM", "2", "True")
    assert not (tmp_path / "time_vs_T_fp32.png").exists()


def test_custom_case_and_dtype_filters():
    configs = cfgs.build_configs("cpu", T=(5,), B=(3,), H=(16,), dtype=("bf16",), layers=3, bidirectional=True)
    assert configs == [cfgs.Config(T=5, B=3, H=16, I=16, layers=3, bidirectional=True, dtype="bf16")]
    assert {c.layers for c in cfgs.build_configs("cpu", cases=("single",))} == {1}


def test_bad_filter_is_an_error(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--impl", "nope"]) == 2
    assert main([*TINY, "--out", str(tmp_path), "--T", "0"]) == 2
    assert "error" in capsys.readouterr().err


class _Raises(torch.nn.Module):
    def forward(self, x):
        raise BackendUnsupportedError("LSTM backend 'x' cannot serve this call: test")


class _UnsupportedProvider(providers.Provider):
    name = "unsupported"

    def build(self, base, cfg):
        return _Raises()


class _BrokenBuildProvider(providers.Provider):
    name = "broken-build"

    def build(self, base, cfg):
        raise RuntimeError("cannot build")


def test_failing_provider_is_recorded_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(providers.PROVIDERS, "unsupported", _UnsupportedProvider())
    monkeypatch.setitem(providers.PROVIDERS, "broken-build", _BrokenBuildProvider())
    rows = run_cli(tmp_path, "--T", "4", "--impl", "nn.LSTM,unsupported,broken-build", "--case", "single")
    by_impl = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    assert all(r["status"] == "ok" for r in by_impl["nn.LSTM"])
    for r in by_impl["unsupported"]:
        assert r["status"] == "skipped"
        assert "BackendUnsupportedError" in r["note"] and "test" in r["note"]
        assert r["median_ms"] == "" and r["speedup_vs_cudnn"] == ""
    for r in by_impl["broken-build"]:
        assert r["status"] == "skipped" and "cannot build" in r["note"]
    assert "Notes and skips" in (tmp_path / report.MD_NAME).read_text()


def test_unavailable_provider_is_skipped_up_front(tmp_path):
    rows = run_cli(tmp_path, "--T", "4", "--impl", "nn.LSTM,flashrnn", "--pass", "fwd", "--case", "single", "--no-plots")
    flash = [r for r in rows if r["impl"] == "flashrnn"]
    assert len(flash) == 1 and flash[0]["status"] == "skipped" and "CUDA" in flash[0]["note"]


def test_budget_exhausted_records_skips(tmp_path):
    rows = run_cli(tmp_path, "--T", "4,8", "--case", "single", "--budget-s", "1e-9", "--no-plots")
    assert rows and all(r["status"] == "skipped" and "budget" in r["note"] for r in rows)


# ---- units -----------------------------------------------------------------------------


def test_stats_on_a_known_list():
    s = timing.summarize([float(v) for v in range(10, 0, -1)])  # 1..10, unsorted
    assert (s.median_ms, s.p10_ms, s.p90_ms, s.reps) == (pytest.approx(5.5), pytest.approx(1.9), pytest.approx(9.1), 10)
    s = timing.summarize([3.0, 1.0, 2.0])
    assert (s.median_ms, s.p10_ms, s.p90_ms) == (2.0, pytest.approx(1.2), pytest.approx(2.8))
    assert timing.summarize([4.0]).median_ms == 4.0
    np = pytest.importorskip("numpy")
    xs = list(np.random.default_rng(0).random(37))
    for q in (10, 50, 90):
        assert timing.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_rotation_count():
    assert timing.rotation_count(1) == timing.MAX_ROTATION
    assert timing.rotation_count(10 * 2**30) == 2
    assert timing.rotation_count(30 * 2**20) == 4


def test_budget_reps():
    b = timing.Budget(None, min_reps=20, max_reps=100)
    assert b.cap([1e9]) == float("inf")
    assert b.reps_for(1e-6, b.cap([1.0])) == (100, False)  # cheap: more reps
    assert b.reps_for(1.0, b.cap([1.0])) == (20, False)  # no budget: the minimum
    b = timing.Budget(100.0, min_reps=20, max_reps=100)
    assert b.reps_for(1.0, 10.0) == (10, True)  # the share fits 10 calls: reduced
    assert b.reps_for(1.0, 2.0) == (5, True)  # never below the floor...
    assert b.reps_for(1.0, 1.0) == (0, True)  # ...but skipped when even the floor is far too long
    assert b.reps_for(0.1, 5.0) == (20, False)  # fits: the minimum, no more (not a cheap call)
    assert b.reps_for(0.01, 0.15) == (15, True)  # a cheap call in a tight share


def test_budget_water_filling():
    b = timing.Budget(10.0)
    assert b.cap([1.0, 2.0, 3.0]) == float("inf")  # everything fits
    # [1, 5, 20] in 10 s: the small one keeps its 1 s, the other two get (10 - 1) / 2 each
    assert b.cap([20.0, 1.0, 5.0]) == pytest.approx(4.5, rel=1e-3)
    b.calibrate(1.0, 2.0)  # measurements take twice their estimate
    assert b.scale == pytest.approx(2.0)
    assert b.cap([0.5, 2.5, 10.0]) == pytest.approx(4.5, rel=1e-3)


def test_cuda_timer_and_peak_memory_with_fake_events(monkeypatch):
    """The CUDA branch of the timer and of PeakMemory, with torch.cuda faked (no GPU here)."""
    import time

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    allocated = {"now": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=allocated["now"]))
    seen = []

    def run(i):
        seen.append(i)
        allocated["peak"] = max(allocated["peak"], allocated["now"] + 3 * 2**20)
        time.sleep(0.001)

    with timing.PeakMemory("cuda") as peak:
        times = timing.time_calls(run, 4, "cuda", start_index=2)
    assert seen == [2, 3, 4, 5]
    assert len(times) == 4 and all(t >= 0.9 for t in times)
    assert peak.mb == pytest.approx(3.0)
    with timing.PeakMemory("cpu") as cpu_peak:
        pass
    assert cpu_peak.mb is None


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's timing and memory calls faked on the CPU, and tensors allocated on the CPU."""
    import time

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    state = {"sync_error": None}

    def synchronize():
        if state["sync_error"]:
            raise RuntimeError(state["sync_error"])

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(runner, "tensor_device", lambda device: "cpu")
    return state


def _tiny_plan(impls, device="cuda"):
    configs = [cfgs.Config(T=4, B=2, H=8, I=8, layers=1, bidirectional=False, dtype="fp32"),
               cfgs.Config(T=8, B=2, H=8, I=8, layers=1, bidirectional=False, dtype="fp32")]  # fmt: skip
    todo, skipped = runner.plan(configs, impls, ["fwd", "fwd_bwd"], device, explicit_impls=True)
    assert not skipped
    return todo


def test_sweep_on_the_cuda_path_with_fake_cuda(fake_cuda):
    results = runner.run_sweep(_tiny_plan(["nn.LSTM", "fused-reference"]), "cuda", warmup=1, min_reps=3, max_reps=4,
                               budget_s=60, progress=False)  # fmt: skip
    assert len(results) == 8
    for r in results:
        assert r.status == "ok", r
        assert r.peak_mem_mb == pytest.approx(1.0)
        assert 3 <= r.stats.reps <= 4


class _CrashProvider(providers.Provider):
    name = "crash"

    def __init__(self, state):
        self.state = state

    def build(self, base, cfg):
        state = self.state

        class Crash(torch.nn.Module):
            def forward(self, x):
                state["sync_error"] = "CUDA error: an illegal memory access was encountered"
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        return Crash()


def test_broken_cuda_context_skips_the_rest(fake_cuda, monkeypatch):
    monkeypatch.setitem(providers.PROVIDERS, "crash", _CrashProvider(fake_cuda))
    results = runner.run_sweep(_tiny_plan(["nn.LSTM", "crash"]), "cuda", warmup=1, min_reps=3, progress=False)
    assert len(results) == 8
    first = [r for r in results if r.config.T == 4]  # the cheaper config runs first; nn.LSTM first within it
    assert [r.status for r in first if r.measurement.impl == "nn.LSTM"] == ["ok", "ok"]
    crashed = [r for r in first if r.measurement.impl == "crash"]
    assert "illegal memory access" in crashed[0].note
    later = [r for r in results if r not in first or r is crashed[1]]
    assert all(r.status == "skipped" and "CUDA context unusable" in r.note for r in later)


def test_cudnn_persistent_eligible():
    ok = cfgs.Config(T=128, B=64, H=512, I=512, layers=1, bidirectional=False, dtype="fp16")
    assert cfgs.cudnn_persistent_eligible(ok)
    for change in (dict(dtype="bf16"), dict(B=256), dict(B=12), dict(H=768 + 64, I=832), dict(layers=2), dict(bidirectional=True)):
        assert not cfgs.cudnn_persistent_eligible(cfgs.Config(**{**ok.__dict__, **change})), change


def test_default_grids():
    cpu = cfgs.build_configs("cpu")
    assert {c.dtype for c in cpu} == {"fp32"} and max(c.T for c in cpu) <= 64
    assert providers.default_impls("cpu") == ["nn.LSTM", "fused-auto", "fused-auto-compile", "fused-reference",
                                              "fused-auto-recompute"]
    assert cfgs.default_limits("fused-auto-compile", cfgs.Config(64, 8, 64, 64, 1, False, "fp32"), "cpu") is None
    assert cfgs.default_limits("fused-auto-compile", cfgs.Config(16, 8, 64, 64, 1, False, "fp32"), "cpu")
    gpu = cfgs.build_configs("cuda")
    single = [c for c in gpu if c.layers == 1 and not c.reset_rate]
    assert len(single) == 4 * 5 * 4 * 3  # T x B x H x dtype
    assert [(c.T, c.B, c.H) for c in gpu if c.reset_rate] == [(128, 128, 256)] * 3  # TorchRL's, in each dtype
    assert {(c.layers, c.bidirectional) for c in gpu} == {(1, False), (2, True)}
    assert {c.I for c in gpu} == {c.H for c in gpu}
    small = cfgs.Config(T=16, B=8, H=512, I=512, layers=1, bidirectional=False, dtype="bf16")
    assert cfgs.default_limits("fused-reference", small, "cuda") is None
    assert cfgs.default_limits("fused-reference", cfgs.Config(**{**small.__dict__, "T": 1024}), "cuda")
    assert cfgs.default_limits("fused-reference", cfgs.Config(**{**small.__dict__, "T": 1024}), "cpu") is None
    long_fp32 = cfgs.Config(T=1024, B=16, H=512, I=512, layers=1, bidirectional=False, dtype="fp32")
    for impl in ("fused-cuda-recompute", "fused-triton-recompute"):
        assert cfgs.default_limits(impl, long_fp32, "cuda") is None
        assert cfgs.default_limits(impl, cfgs.Config(**{**long_fp32.__dict__, "dtype": "bf16"}), "cuda")
        assert cfgs.default_limits(impl, cfgs.Config(**{**long_fp32.__dict__, "T": 128}), "cuda")


def test_print_table(tiny_sweep, capsys):
    _, _, rows = tiny_sweep
    report.print_table(rows)
    out = capsys.readouterr().out
    assert "nn.LSTM" in out and "fused-reference" in out and "fwd_bwd" in out
    assert len(out.strip().splitlines()) == 2 + 4  # title, column header, 2 T x 2 passes


def test_table_says_which_ratio_it_shows(tiny_sweep, capsys):
    """On the CPU the ratio is paired: the cell names the nn.LSTM median it divides, and the title says so."""
    _, _, rows = tiny_sweep
    report.print_table(rows)
    out = capsys.readouterr().out
    assert "timed interleaved with this row (paired" in out.splitlines()[0]
    row = next(r for r in rows if r["impl"] == "fused-reference")
    paired, median = float(row["paired_baseline_ms"]), float(row["median_ms"])
    assert f"{median:.3g} ({paired / median:.3g}x of {paired:.3g})" in out


# ---- memory ----------------------------------------------------------------------------------


def test_saved_mb_is_what_the_forward_keeps(tiny_sweep):
    """The column is the hooks' count of one training forward: recompute on the reference keeps its
    checkpoints more than the reference's normal mode (lstm_kernels/recompute.py's formula), and the
    count matches measuring the provider's module directly."""
    from benchmarks.memory import module_saved_bytes
    from lstm_kernels.recompute import segment_bounds, segment_length

    _, _, rows = tiny_sweep
    saved = {(r["impl"], int(r["T"])): float(r["saved_mb"]) * 2**20 for r in rows if r["pass"] == "fwd_bwd"}
    B, H = 2, 8
    for T in (4, 8):
        checkpoints = (len(segment_bounds(T, segment_length(T, True))) - 1) * B * H * 4
        assert checkpoints > 0
        assert saved[("fused-auto-recompute", T)] - saved[("fused-reference", T)] == pytest.approx(checkpoints, abs=1)
        cfg = cfgs.Config(T=T, B=B, H=H, I=H, layers=1, bidirectional=False, dtype="fp32")
        torch.manual_seed(0)
        base = torch.nn.LSTM(H, H)
        for impl in ("nn.LSTM", "fused-reference"):
            module = providers.PROVIDERS[impl].build(base, cfg)
            x = torch.randn(T, B, H, requires_grad=True)
            assert module_saved_bytes(module, x) == pytest.approx(saved[(impl, T)], abs=1)


def test_memory_table_in_the_markdown_and_on_stdout(tiny_sweep, capsys):
    out, _, rows = tiny_sweep
    md = (out / report.MD_NAME).read_text()
    assert "## Memory (fwd_bwd)" in md
    table = report.format_memory_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["dtype", "L", "H", "B", "T"] and "fused-auto-recompute" in lines[0]
    assert len(lines) == 1 + 2  # header, 2 T (fwd_bwd only)
    recompute = next(r for r in rows if r["impl"] == "fused-auto-recompute" and r["pass"] == "fwd_bwd" and r["T"] == "8")
    base = next(r for r in rows if r["impl"] == "nn.LSTM" and r["pass"] == "fwd_bwd" and r["T"] == "8")
    ratio = float(recompute["saved_mb"]) / float(base["saved_mb"])
    assert f"{float(recompute['saved_mb']):.3g} ({ratio:.2g}x)" in table
    assert report.format_memory_table([r for r in rows if r["pass"] == "fwd"]) == ""


def test_a_failed_memory_measurement_keeps_the_timing(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("hooks refused")

    monkeypatch.setattr(runner, "saved_tensor_bytes", broken)
    cfg = cfgs.Config(T=4, B=2, H=8, I=8, layers=1, bidirectional=False, dtype="fp32")
    todo, _ = runner.plan([cfg], ["nn.LSTM"], ["fwd_bwd"], "cpu", explicit_impls=True)
    (result,) = runner.run_sweep(todo, "cpu", warmup=1, min_reps=3, max_reps=3, progress=False)
    assert result.status == "ok" and result.saved_mb is None
    assert "saved bytes not measured: RuntimeError: hooks refused" in result.note


def test_resets_case_and_its_nn_lstm_baseline():
    """The resets case (TorchRL's configuration) has its own grid and rate; nn.LSTM runs it by cutting
    rows into episodes, which gives what FusedLSTM gives with resets."""
    configs = cfgs.build_configs("cpu", cases=("resets",))
    assert [(c.T, c.B, c.H, c.reset_rate) for c in configs] == [(64, 16, 64, cfgs.RESET_RATE)]
    assert all(c.reset_rate == 0 for c in cfgs.build_configs("cpu", cases=("single", "bidir")))
    assert "resets 3%" in configs[0].label()
    cfg = cfgs.Config(T=9, B=5, H=6, I=4, layers=2, bidirectional=False, dtype="fp32", reset_rate=0.2)
    torch.manual_seed(0)
    base = torch.nn.LSTM(cfg.I, cfg.H, cfg.layers)
    resets = cfgs.reset_pattern(cfg, "cpu")
    assert resets.any() and resets.shape == (cfg.T, cfg.B)
    x = torch.randn(cfg.T, cfg.B, cfg.I)
    split = providers.PROVIDERS["nn.LSTM"].build(base, cfg)(x)
    fused = providers.PROVIDERS["fused-reference"].build(base, cfg)(x)
    assert_rel_close(fused, split, 1e-5, "output")
    with pytest.raises(NotImplementedError, match="resets"):
        providers.PROVIDERS["fused-auto-compile"].build(base, cfg)


def test_gru_cell_axis_runs_against_nn_gru(tmp_path):
    """--cell lstm,gru repeats each config per cell; a GRU config builds every provider from an nn.GRU
    (FusedGRU with its weights, same outputs), its speedups are against the nn.GRU row of the same
    config, and the LSTM-only providers (recompute, flashrnn) are recorded as skips."""
    configs = cfgs.build_configs("cpu", T=(4,), B=(2,), H=(8,), cases=("single",), cells=("lstm", "gru"))
    assert [c.cell for c in configs] == ["lstm", "gru"] and "GRU" in configs[1].label()
    gru_cfg = configs[1]
    torch.manual_seed(0)
    base = torch.nn.GRU(gru_cfg.I, gru_cfg.H)
    x = torch.randn(gru_cfg.T, gru_cfg.B, gru_cfg.I)
    expected = providers.PROVIDERS["nn.LSTM"].build(base, gru_cfg)(x)
    for impl in ("fused-auto", "fused-reference"):
        module = providers.PROVIDERS[impl].build(base, gru_cfg)
        assert type(module.lstm).__name__ == "FusedGRU"
        assert_rel_close(module(x), expected, 1e-5, impl)
    for impl in ("fused-reference-recompute", "flashrnn"):
        with pytest.raises(NotImplementedError, match="LSTM only"):
            providers.PROVIDERS[impl].build(base, gru_cfg)

    rows = run_cli(tmp_path, "--T", "4", "--case", "single", "--cell", "lstm,gru", "--no-plots")
    assert {r["cell"] for r in rows} == {"lstm", "gru"}
    for cell in ("lstm", "gru"):
        mine = [r for r in rows if r["cell"] == cell]
        assert {r["impl"] for r in mine} == {"nn.LSTM", "fused-auto", "fused-reference", "fused-auto-recompute"}
        recompute = [r for r in mine if r["impl"] == "fused-auto-recompute"]
        assert all((r["status"] == "ok") == (cell == "lstm") for r in recompute)
        unpaired = [dict(r, paired_baseline_ms="") for r in rows]
        report.add_speedups(unpaired)
        base_ms = {r["pass"]: float(r["median_ms"]) for r in mine if r["impl"] == "nn.LSTM"}
        for r in (r for r in unpaired if r["cell"] == cell and r["status"] == "ok"):
            assert float(r["speedup_vs_cudnn"]) == pytest.approx(base_ms[r["pass"]] / float(r["median_ms"]), rel=1e-4)
    assert main([*TINY, "--out", str(tmp_path), "--cell", "rnn", "--dry-run"]) == 2
