"""Smoke test of examples/adding_problem.py on a tiny configuration (the full result is the committed plot)."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lstm_kernels import FusedLSTM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "adding_problem.py"

# Short sequences, small models, few steps: seconds on a slow CPU. (FusedLSTM reaches a held-out
# MSE of 0.002-0.005 here for seeds 0-7, against a baseline of 0.167.)
STEPS = 400
TINY = ["--T", "10", "--steps", str(STEPS), "--batch", "32", "--hidden", "16"]
TINY += ["--eval-size", "500", "--tail", "50", "--quiet"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("adding_problem_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _read_csv(path):
    lines = path.read_text().splitlines()
    comments = [line for line in lines if line.startswith("# ")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return comments, rows


def test_baseline_is_the_variance_of_the_target(example):
    """Predicting 1.0 scores Var(U1 + U2) = 1/6 on the example's own data."""
    _, y = example.make_batch(20000, 50, torch.Generator().manual_seed(0))
    empirical = torch.mean((y - 1.0) ** 2).item()
    assert example.BASELINE_MSE == pytest.approx(1 / 6)
    assert empirical == pytest.approx(example.BASELINE_MSE, rel=0.03)


def test_batches_have_two_markers_and_the_right_sum(example):
    x, y = example.make_batch(64, 9, torch.Generator().manual_seed(3))
    assert x.shape == (64, 9, 2) and y.shape == (64,)
    markers = x[..., 1]
    assert torch.all(markers.sum(dim=1) == 2)
    assert torch.all(markers[:, : 9 // 2].sum(dim=1) == 1), "one marker in the first half"
    torch.testing.assert_close((x[..., 0] * markers).sum(dim=1), y)
    assert torch.all((x[..., 0] >= 0) & (x[..., 0] <= 1))


def test_tiny_run_writes_plot_and_csv_and_lstm_beats_baseline(example, tmp_path):
    threads = torch.get_num_threads()
    result = example.main([*TINY, "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads, "main must restore the thread count"

    png, csv_path = tmp_path / "adding_problem.png", tmp_path / "adding_problem.csv"
    assert result["png"] == png and result["csv"] == csv_path
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    comments, rows = _read_csv(csv_path)
    header = "\n".join(comments)
    needles = ("T=10", "seed 0", f"torch {torch.__version__}", "lstm_kernels 0", "FusedLSTM backend auto", "device: CPU")
    for needle in needles:
        assert needle in header, needle
    assert len(rows) == STEPS and rows[0]["step"] == "0" and rows[-1]["step"] == str(STEPS - 1)
    for column in ("lstm_mse", "lstm_grad_norm", "rnn_mse", "rnn_grad_norm"):
        values = [float(r[column]) for r in rows]
        assert all(v >= 0 and v == v for v in values), column
    # The CSV holds the curves the run measured.
    assert [float(r["lstm_mse"]) for r in rows] == pytest.approx(result["lstm"]["mse"], rel=1e-5)

    baseline = example.BASELINE_MSE
    lstm = result["lstm"]
    # Learning, not noise: well under the MSE of ignoring the input, on held-out data and in training.
    assert lstm["test_mse"] < 0.25 * baseline, lstm["test_mse"]
    assert lstm["final_train_mse"] < baseline, lstm["final_train_mse"]
    assert lstm["final_train_mse"] < sum(lstm["mse"][:20]) / 20, "the training loss must fall"


def test_seeded_runs_are_identical(example, tmp_path):
    short = ["--T", "8", "--steps", "15", "--batch", "8", "--hidden", "8", "--eval-size", "50", "--quiet"]
    a = example.main([*short, "--out-dir", str(tmp_path / "a")])
    b = example.main([*short, "--out-dir", str(tmp_path / "b")])
    for key in ("lstm", "rnn"):
        assert a[key]["mse"] == b[key]["mse"] and a[key]["grad_norm"] == b[key]["grad_norm"]
    assert _read_csv(tmp_path / "a" / "adding_problem.csv")[1] == _read_csv(tmp_path / "b" / "adding_problem.csv")[1]
    assert a["lstm"]["test_mse"] == b["lstm"]["test_mse"]


def test_clip_zero_reports_the_unclipped_norm(example):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert example.total_grad_norm(params, clip=0) == pytest.approx(5.0)
    assert params[0].grad.tolist() == [3.0, 0.0], "clip=0 must not touch the gradients"
    assert example.total_grad_norm(params, clip=1.0) == pytest.approx(5.0), "the norm before clipping"
    assert torch.linalg.vector_norm(torch.cat([p.grad for p in params])).item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("cls", [FusedLSTM, torch.nn.LSTM], ids=["FusedLSTM", "nn.LSTM"])
def test_forget_bias_flag_sets_the_forget_slice_only(example, cls):
    """--forget-bias: bias_ih's forget slice [H:2H] = value, bias_hh's = 0, in every layer and direction."""
    lstm = cls(3, 5, num_layers=2, bidirectional=True)
    before = {n: p.detach().clone() for n, p in lstm.named_parameters()}
    example.set_forget_bias_(lstm, 1.0)
    H = lstm.hidden_size
    keep = torch.ones(4 * H, dtype=torch.bool)
    keep[H : 2 * H] = False
    biases = [n for n in before if n.startswith("bias_")]
    assert len(biases) == 2 * lstm.num_layers * (2 if lstm.bidirectional else 1)
    for name, p in lstm.named_parameters():
        if name.startswith("bias_"):
            assert torch.all(p[H : 2 * H] == (1.0 if name.startswith("bias_ih") else 0.0)), name
            assert torch.equal(p[keep], before[name][keep]), name
        else:
            assert torch.equal(p, before[name]), name


def test_defaults_write_beside_not_over_the_committed_result(example):
    """The committed examples/adding_problem.{png,csv} are the defaults' result; a run writes to examples/out/."""
    args = example.parse_args([])
    assert args.out_dir.resolve() != EXAMPLE.parent.resolve()
    assert args.out_dir.resolve().parent == EXAMPLE.parent.resolve()


def test_quick_sets_short_defaults_that_explicit_flags_override(example):
    args = example.parse_args(["--quick"])
    assert (args.T, args.steps) == (example.QUICK["T"], example.QUICK["steps"])
    args = example.parse_args(["--quick", "--T", "12"])
    assert (args.T, args.steps) == (12, example.QUICK["steps"])
    assert example.parse_args([]).T == 100
