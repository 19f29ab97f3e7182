"""The adding problem: FusedLSTM carries a signal across a long time lag that a plain RNN cannot.

Hochreiter & Schmidhuber's long-time-lag experiment (1997; in the form of Le,
Jaitly & Hinton 2015). Each input sequence has T steps of two features:

    value   a random number in [0, 1]
    marker  1 at exactly two steps (one in the first half, one in the second), 0 elsewhere

and the target is the sum of the two marked values. A model that ignores its
input can do no better than predicting the mean, 1.0, which scores
MSE = Var(U1 + U2) = 1/12 + 1/12 = 1/6 ≈ 0.167: the baseline. To beat it a
model must hold the first marked value for at least T/2 steps, and its
gradient must travel back as far: an LSTM's cell state carries it, a tanh
RNN's gradient vanishes (or, unclipped, explodes).

This script trains FusedLSTM and, for contrast, ``torch.nn.RNN`` (tanh) of the
same hidden size on the same batches, with Adam and
``torch.nn.utils.clip_grad_norm_``; logs the training MSE and the gradient norm
(before clipping) of every step; and writes

    <out-dir>/adding_problem.csv   the curves, headed by '# ' lines (device, versions, settings)
    <out-dir>/adding_problem.png   MSE (with the 1/6 baseline) and gradient norm against step

The defaults (T=100, 2,000 steps) take about a minute on one CPU thread:

    python examples/adding_problem.py                       # writes into examples/
    python examples/adding_problem.py --T 500 --steps 10000 --device cuda --out-dir out/

The LSTM sits on the baseline for a while, then breaks through; the wait grows
with T (steps until the training MSE fell below 0.05, seeds 0-4 or 0-2 on a CPU:
620-1200 at T=100, 1280-1490 at T=200), so give longer sequences more steps.
``--clip 0`` turns clipping off; ``--forget-bias 1.0`` sets the LSTM's
forget-gate bias (Jozefowicz et al. 2015), which here did not speed learning
up: see the README.

Everything is seeded: the same flags on the same machine give the same files
(the CSV's timing comment aside).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lstm_kernels  # noqa: E402
from lstm_kernels import FusedLSTM  # noqa: E402

#: MSE of predicting 1.0 whatever the input: the variance of the sum of two U(0, 1).
BASELINE_MSE = 2 * (1.0 / 12.0)

#: The held-out sequences of seed s are drawn from seed HELD_OUT_SEED + s.
HELD_OUT_SEED = 1_000_000

HERE = Path(__file__).resolve().parent


# ---- data ---------------------------------------------------------------------------


def make_batch(batch: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the adding problem, on the CPU: x [batch, T, 2] (value, marker), y [batch]."""
    if seq_len < 2:
        raise ValueError(f"the adding problem needs T >= 2, got {seq_len}")
    values = torch.rand(batch, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, seq_len, (batch,), generator=generator)
    rows = torch.arange(batch)
    markers = torch.zeros(batch, seq_len)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = values[rows, first] + values[rows, second]
    return x, y


# ---- models -------------------------------------------------------------------------


class Regressor(nn.Module):
    """A recurrent layer (batch_first) read out by a linear layer at the last step."""

    def __init__(self, rnn: nn.Module, hidden_size: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def set_forget_bias_(lstm: nn.Module, value: float) -> None:
    """Forget-gate bias ``value`` (Jozefowicz et al. 2015 suggest 1.0) in every layer and direction.

    Gates are stacked i, f, g, o, so the forget gate is the slice [H:2H] of
    both biases; bias_ih gets ``value`` and bias_hh 0, so the gate sees
    exactly ``value``. Works on FusedLSTM and nn.LSTM alike (same parameters).
    """
    H = lstm.hidden_size
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias_ih"):
                p[H : 2 * H] = value
            elif name.startswith("bias_hh"):
                p[H : 2 * H] = 0.0


def build_model(kind: str, args: argparse.Namespace, device: torch.device) -> Regressor:
    """The model ``kind`` ('lstm' or 'rnn'), initialised from ``args.seed`` alone."""
    torch.manual_seed(args.seed)
    if kind == "lstm":
        rnn = FusedLSTM(2, args.hidden, batch_first=True, backend=args.backend)
        if args.forget_bias is not None:
            set_forget_bias_(rnn, args.forget_bias)
    elif kind == "rnn":
        rnn = nn.RNN(2, args.hidden, nonlinearity="tanh", batch_first=True)
    else:
        raise ValueError(kind)
    return Regressor(rnn, args.hidden).to(device)


# ---- training -----------------------------------------------------------------------


def total_grad_norm(params: list[nn.Parameter], clip: float) -> float:
    """Clip the gradients to norm ``clip`` (0: no clipping); return their total 2-norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    elif hasattr(torch.nn.utils, "get_total_norm"):
        norm = torch.nn.utils.get_total_norm(grads)
    else:  # torch < 2.6
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return float(norm)


def train(kind: str, args: argparse.Namespace, device: torch.device, label: str) -> dict:
    """Train one model; returns its per-step curves and its held-out MSE at the end."""
    model = build_model(kind, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    data = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    mse, grad_norm = [], []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=label, disable=args.quiet, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        x, y = make_batch(args.batch, args.T, data)
        x, y = x.to(device), y.to(device)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = total_grad_norm(params, args.clip)
        optimizer.step()
        mse.append(loss.item())
        grad_norm.append(norm)
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(mse=f"{mse[-1]:.4f}", grad_norm=f"{norm:.3g}")
    bar.close()
    seconds = time.perf_counter() - start
    held_out = torch.Generator().manual_seed(HELD_OUT_SEED + args.seed)  # never a training stream's seed
    test_x, test_y = make_batch(args.eval_size, args.T, held_out)
    model.eval()
    with torch.no_grad():
        test_mse = float(nn.functional.mse_loss(model(test_x.to(device)), test_y.to(device)))
    tail = mse[-min(args.tail, len(mse)) :]
    return {
        "label": label,
        "mse": mse,
        "grad_norm": grad_norm,
        "test_mse": test_mse,
        "final_train_mse": sum(tail) / len(tail),
        "seconds": seconds,
    }


# ---- what ran where -----------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {name} ({threads} thread{'s' if threads != 1 else ''})"


def backend_description(requested: str, device: torch.device) -> str:
    """The backend FusedLSTM was asked for and the path it runs on a training batch (FusedLSTM.path_for)."""
    sample = torch.zeros(1, 2, 2, device=device)  # [batch, T, features], as the example feeds it
    path = FusedLSTM(2, 1, batch_first=True, backend=requested, device=device).path_for(sample)
    env = os.environ.get(lstm_kernels.backends.ENV_VAR)
    via = f" ({lstm_kernels.backends.ENV_VAR}={env})" if requested == "auto" and env else ""
    return f"{requested}{via} -> {path}"


def header(args: argparse.Namespace, device: torch.device) -> dict[str, str]:
    clip = f"clip_grad_norm {args.clip:g}" if args.clip > 0 else "no clipping"
    forget = "" if args.forget_bias is None else f", LSTM forget bias {args.forget_bias:g}"
    return {
        "problem": f"adding problem, T={args.T}, seed {args.seed}",
        "training": (
            f"{args.steps} steps of batch {args.batch}, hidden {args.hidden}, Adam lr {args.lr:g}, {clip}"
            f"{forget}"
        ),
        "device": device_name(device),
        "versions": (
            f"torch {torch.__version__} | lstm_kernels {lstm_kernels.__version__}"
            f" | FusedLSTM backend {backend_description(args.backend, device)}"
        ),
    }


# ---- output -------------------------------------------------------------------------


def write_csv(path: Path, info: dict[str, str], runs: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        f.write(f"# baseline_mse (predict 1.0): {BASELINE_MSE:.6f}\n")
        for run in runs:
            f.write(
                f"# {run['label']}: test_mse {run['test_mse']:.6f} on {run['eval_size']} held-out sequences,"
                f" mean train_mse of the last {run['tail']} steps {run['final_train_mse']:.6f},"
                f" {run['seconds']:.1f} s\n"
            )
        writer = csv.writer(f)
        columns = ["step"]
        for run in runs:
            columns += [f"{run['key']}_mse", f"{run['key']}_grad_norm"]
        writer.writerow(columns)
        for step in range(len(runs[0]["mse"])):
            row = [step]
            for run in runs:
                row += [f"{run['mse'][step]:.6g}", f"{run['grad_norm'][step]:.6g}"]
            writer.writerow(row)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` steps (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(path: Path, info: dict[str, str], runs: list[dict], window: int, clip: float) -> None:
    fig, (ax_mse, ax_norm) = plt.subplots(2, 1, figsize=(12, 8), sharex=True, constrained_layout=True)
    colors = {"lstm": "tab:blue", "rnn": "tab:red"}
    for run in runs:
        steps = range(len(run["mse"]))
        color = colors[run["key"]]
        ax_mse.plot(steps, run["mse"], color=color, alpha=0.2, linewidth=0.6)
        ax_mse.plot(
            steps,
            moving_average(run["mse"], window),
            color=color,
            linewidth=1.8,
            label=f"{run['label']}: held-out MSE {run['test_mse']:.4f}",
        )
        ax_norm.plot(steps, run["grad_norm"], color=color, alpha=0.2, linewidth=0.6)
        ax_norm.plot(steps, moving_average(run["grad_norm"], window), color=color, linewidth=1.8, label=run["label"])
    baseline = "baseline: predict 1.0 (ignore the input), MSE 1/6 ≈ 0.167"
    ax_mse.axhline(BASELINE_MSE, color="black", linestyle="--", linewidth=1.2, label=baseline)
    ax_mse.set_yscale("log")
    ax_mse.set_ylabel("training MSE (per step; line: mean of %d)" % window)
    # beside the axes, so that no curve is hidden behind a legend
    ax_mse.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax_mse.grid(True, which="both", alpha=0.3)
    if clip > 0:
        ax_norm.axhline(clip, color="black", linestyle=":", linewidth=1.2, label=f"clip_grad_norm_ max_norm {clip:g}")
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("gradient norm before clipping")
    ax_norm.set_xlabel("training step")
    ax_norm.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax_norm.grid(True, which="both", alpha=0.3)
    fig.suptitle("\n".join(info.values()), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--T", type=int, default=100, help="sequence length (the time lag is at least T/2)")
    p.add_argument("--steps", type=int, default=2000, help="training steps per model")
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of both models")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="clip_grad_norm_ max norm; 0 turns clipping off")
    p.add_argument(
        "--forget-bias",
        type=float,
        default=None,
        help="set the LSTM's forget-gate bias to this (e.g. 1.0); by default FusedLSTM keeps nn.LSTM's init",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the models' initialisation and the data")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--backend", default="auto", help="FusedLSTM backend: auto or one of lstm_kernels.available_backends()"
    )
    p.add_argument("--models", default="lstm,rnn", help="which models to train, comma-separated: lstm, rnn")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); 1 is fastest for these small, step-by-step matmuls",
    )
    p.add_argument("--eval-size", type=int, default=2000, help="held-out sequences for the final MSE")
    p.add_argument("--tail", type=int, default=100, help="final training MSE = mean over this many last steps")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window of the plotted lines")
    p.add_argument("--out-dir", type=Path, default=HERE / "out",
                   help="where adding_problem.png and .csv go (the committed ones in examples/ are the defaults' result)")
    p.add_argument("--quick", action="store_true",
                   help=f"T={QUICK['T']} and {QUICK['steps']} steps unless given: the effect in about 15 s on one CPU thread")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    quick, _ = p.parse_known_args(argv)
    if quick.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("lstm", "rnn") for m in models):
        p.error(f"--models takes lstm and/or rnn, got {args.models!r}")
    args.models = models
    if args.T < 2 or args.steps < 1 or args.batch < 1 or args.hidden < 1:
        p.error("--T must be >= 2 and --steps, --batch, --hidden >= 1")
    return args


LABELS = {"lstm": "FusedLSTM", "rnn": "nn.RNN (tanh)"}
#: --quick: a lag short enough to learn in a few hundred steps, long enough that the tanh RNN does not.
QUICK = {"T": 30, "steps": 300}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the experiment; returns {'lstm': run, 'rnn': run, 'csv': path, 'png': path, 'header': ...}."""
    args = parse_args(argv)
    device = torch.device(args.device)
    old_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        # Seeded runs that leave the caller's random state as it was.
        cuda_devices = []
        if device.type == "cuda":
            cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda_devices):
            info = header(args, device)
            for line in info.values():
                print(line, flush=True)
            runs = []
            for kind in args.models:
                run = train(kind, args, device, LABELS[kind])
                run.update(key=kind, eval_size=args.eval_size, tail=min(args.tail, args.steps))
                print(
                    f"{run['label']}: held-out MSE {run['test_mse']:.4f} (baseline {BASELINE_MSE:.4f}),"
                    f" last {run['tail']} steps' training MSE {run['final_train_mse']:.4f},"
                    f" {run['seconds']:.1f} s",
                    flush=True,
                )
                runs.append(run)
    finally:
        torch.set_num_threads(old_threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out_dir / "adding_problem.csv", args.out_dir / "adding_problem.png"
    write_csv(csv_path, info, runs)
    plot(png_path, info, runs, args.smooth, args.clip)
    print(f"wrote {csv_path} and {png_path}")
    result = {run["key"]: run for run in runs}
    result.update(csv=csv_path, png=png_path, header=info)
    return result


if __name__ == "__main__":
    main()
