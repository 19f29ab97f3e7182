"""A small subset of the benchmark sweep as pytest-benchmark tests.

    pytest tests/test_benchmarks_pytest_benchmark.py                 # runs (and times) them
    pytest tests/test_benchmarks_pytest_benchmark.py --benchmark-disable   # runs each once, no timing

They use the suite's own providers and rotated inputs (benchmarks/), on the
GPU when there is one, else on a CPU-sized shape. No speed is asserted.
"""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.configs import Config  # noqa: E402
from benchmarks.providers import PROVIDERS  # noqa: E402
from benchmarks.runner import Inputs, make_runner  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = (
    Config(T=128, B=16, H=512, I=512, layers=1, bidirectional=False, dtype="bf16")
    if DEVICE == "cuda"
    else Config(T=16, B=4, H=32, I=32, layers=1, bidirectional=False, dtype="fp32")
)
# recompute on the reference: the one backend that serves it in bf16 with several segments (lstm_kernels/recompute.py)
IMPLS = ["nn.LSTM", "fused-auto", "fused-reference", "fused-reference-recompute"] + (
    ["fused-triton", "fused-cuda"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_lstm(benchmark, impl, pass_):
    provider = PROVIDERS[impl]
    why = provider.unavailable_reason(DEVICE)
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(0)
    base = torch.nn.LSTM(CONFIG.I, CONFIG.H, device=DEVICE, dtype=CONFIG.torch_dtype)
    module = provider.build(base, CONFIG)
    inputs = Inputs(CONFIG, DEVICE)
    prepare, run = make_runner(module, inputs, pass_)
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        prepare(i)
        run(i)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{CONFIG.label()} {pass_}"
    benchmark.extra_info.update(impl=impl, device=DEVICE, T=CONFIG.T, B=CONFIG.B, H=CONFIG.H, dtype=CONFIG.dtype)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable, which runs step once untimed
        timings = benchmark.stats.stats.data
        assert len(timings) == 10 and all(t > 0 for t in timings)
    # what was timed is the LSTM: the provider's module computes nn.LSTM's output
    x = torch.randn(CONFIG.T, CONFIG.B, CONFIG.I, device=DEVICE, dtype=CONFIG.torch_dtype)
    with torch.no_grad():
        expected, actual = base(x)[0], module(x)
    assert torch.allclose(actual.float(), expected.float(), atol=2e-2 if CONFIG.dtype == "bf16" else 1e-5)
