"""torch.compile as a user meets it: in a fresh process, whatever ran (or did not run) before.

Promises that depend on import order or process state cannot be tested in the suite's own
process, where earlier tests have imported the backends and compiled other models. Each case
here starts a new interpreter, builds a small model, and compiles it with ``fullgraph=True``:

- as the very first call of the process (nothing of lstm_kernels has run);
- after eager calls on the CPU native path (which loads no backend);
- with ``LSTM_KERNELS_BACKEND=reference`` (the per-layer op path and its dispatch);
- ``lstm_layer`` itself compiled as the first call;

and checks outputs and every gradient against ``nn.LSTM`` run eagerly with the same weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn

    def compare(fused, reference, x):
        # Outputs and every gradient of a FusedLSTM against nn.LSTM with the same weights.
        results = {}
        for name, model in (("fused", fused), ("reference", reference)):
            xx = x.detach().clone().requires_grad_(True)
            out, (h, c) = model(xx)
            (out.square().sum() + h.sum() + 2 * c.sum()).backward()
            results[name] = [out, h, c, xx.grad] + [p.grad for p in model.parameters()]
        errors = [float((a - b).abs().max()) for a, b in zip(results["fused"], results["reference"])]
        return max(errors), len(errors)
    """
)

CASES = {
    "compile_is_the_first_call": """
        from lstm_kernels import FusedLSTM
        torch.manual_seed(0)
        fused = FusedLSTM(4, 6, num_layers=2, bidirectional=True)
        reference = fused.to_torch()
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        result = compare(compiled, reference, torch.randn(5, 3, 4))
    """,
    "compile_after_eager_calls_on_the_native_path": """
        from lstm_kernels import FusedLSTM
        torch.manual_seed(0)
        fused = FusedLSTM(4, 6, num_layers=2, batch_first=True)
        reference = fused.to_torch()
        assert fused.path_for(torch.randn(3, 5, 4)) == "native"
        for _ in range(2):
            fused(torch.randn(3, 5, 4))[0].sum().backward()
        fused.zero_grad(set_to_none=True)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        result = compare(compiled, reference, torch.randn(3, 5, 4))
    """,
    "compile_first_with_the_reference_backend_from_the_environment": """
        from lstm_kernels import FusedLSTM
        torch.manual_seed(0)
        fused = FusedLSTM(4, 6, proj_size=3)
        reference = fused.to_torch()
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        result = compare(compiled, reference, torch.randn(5, 3, 4))
        assert fused.path_for(torch.randn(5, 3, 4)) == "reference"
    """,
    "lstm_layer_compiled_as_the_first_call": """
        from lstm_kernels import lstm_layer
        torch.manual_seed(0)
        T, B, H = 5, 3, 6
        lstm = nn.LSTM(H, H, bias=False)
        w_hh = lstm.weight_hh_l0.detach().requires_grad_(True)
        x = torch.randn(T, B, H)
        xg = (x @ lstm.weight_ih_l0.detach().t()).requires_grad_(True)
        h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
        layer = torch.compile(lambda *a: lstm_layer(*a, backend="reference"), fullgraph=True, backend="aot_eager")
        h_all, h_T, c_T = layer(xg, w_hh, h0, c0)
        (h_all.square().sum() + c_T.sum()).backward()
        grads = (xg.grad, w_hh.grad)
        xr = x.detach().requires_grad_(True)
        out, (_, c_n) = lstm(xr)
        (out.square().sum() + c_n.sum()).backward()
        errors = [float((h_all - out).abs().max()), float((w_hh.grad - lstm.weight_hh_l0.grad).abs().max()),
                  float((xg.grad @ lstm.weight_ih_l0.detach() - xr.grad).abs().max())]
        result = (max(errors), len(errors))
    """,
}


def _run_case(source: str, env_extra: dict) -> dict:
    script = _PRELUDE + textwrap.dedent(source) + "\nprint('RESULT ' + json.dumps(result))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_KERNELS_") and k != "TRITON_INTERPRET"}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    max_error, count = json.loads(line[len("RESULT "):])
    return {"max_error": max_error, "count": count}


@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_compile_in_a_fresh_process(case):
    env = {"LSTM_KERNELS_BACKEND": "reference"} if "reference_backend_from_the_environment" in case else {}
    result = _run_case(CASES[case], env)
    assert result["count"] >= 3
    assert result["max_error"] < 1e-4, result


def test_importing_the_package_imports_neither_dynamo_nor_triton_language():
    """The package marks its trace-time constants itself (backends.trace_time_constant), so that
    ``import lstm_kernels`` does not import dynamo, which imports triton.language: Triton decides
    between compiling and interpreting when that is imported, and ``python -m lstm_kernels check``
    turns the interpreter on after the package is imported."""
    script = textwrap.dedent("""
        import sys
        import lstm_kernels
        print("LOADED", "torch._dynamo" in sys.modules, "triton.language" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "LOADED False False" in proc.stdout, proc.stdout + proc.stderr


def test_trace_time_constant_marks_as_torch_does():
    from lstm_kernels.backends import trace_time_constant

    def ours():
        return 1

    def theirs():
        return 1

    torch_marked = torch.compiler.assume_constant_result(theirs)
    assert trace_time_constant(ours) is ours
    assert {k: v for k, v in vars(ours).items()} == {k: v for k, v in vars(torch_marked).items()}
