"""Export like nn.LSTM and nn.GRU: ``torch.onnx.export`` (the dynamo exporter) writes ONNX ``LSTM``
(``GRU``) nodes that onnxruntime runs to nn.LSTM's (nn.GRU's) results, for every configuration ONNX's
LSTM (GRU) can express, with dynamic batch and sequence axes; what it cannot express raises naming the limit;
``torch.export`` round-trips; ``torch.jit.script`` says to use torch.export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lstm_kernels import FusedGRU, FusedLSTM

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

CONFIGS = {
    "plain": dict(),
    "no_bias": dict(bias=False),
    "batch_first": dict(batch_first=True),
    "two_layers": dict(num_layers=2),
    "bidirectional": dict(bidirectional=True),
    "two_layers_bidirectional_batch_first": dict(num_layers=2, bidirectional=True, batch_first=True),
}
I, H = 4, 6


def _x(config, T, B, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((B, T, I) if config.get("batch_first") else (T, B, I), generator=gen)


def _hx(config, B, seed, cell="lstm"):
    """The initial states as the module takes them: (h0, c0) for the LSTM, h0 for the GRU."""
    gen = torch.Generator().manual_seed(seed)
    layers = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    h0 = torch.randn(layers, B, H, generator=gen)
    return (h0, torch.randn(layers, B, H, generator=gen)) if cell == "lstm" else h0


#: cell -> (torch's module, ours, ONNX's node)
CELLS = {"lstm": (nn.LSTM, FusedLSTM, "LSTM"), "gru": (nn.GRU, FusedGRU, "GRU")}


def _export(model, args, dynamic_shapes):
    return torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)


def _flat(outputs):
    """(output, (h_n, c_n)) or (output, h_n) -> [output, h_n(, c_n)]."""
    out, finals = outputs
    return [out, *(finals if isinstance(finals, tuple) else (finals,))]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx_none", "hx"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_onnx_export_runs_in_onnxruntime_like_nn(config_name, with_hx, cell):
    config = CONFIGS[config_name]
    torch_module, fused_module, node = CELLS[cell]
    torch.manual_seed(0)
    reference = torch_module(I, H, **config).eval()
    fused = fused_module.from_torch(reference).eval()
    batch_axis, time_axis = (0, 1) if config.get("batch_first") else (1, 0)
    x = _x(config, 5, 3, seed=1)
    dynamic_x = {batch_axis: torch.export.Dim("batch"), time_axis: torch.export.Dim("time")}
    if with_hx:
        hx = _hx(config, 3, seed=2, cell=cell)
        dynamic_hx = ({1: torch.export.Dim("batch")},) * 2 if cell == "lstm" else {1: torch.export.Dim("batch")}
        args, dynamic = (x, hx), (dynamic_x, dynamic_hx)
    else:
        args, dynamic = (x,), (dynamic_x,)
    program = _export(fused, args, dynamic)
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert ops.count(node) == config.get("num_layers", 1), ops
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for T, B in ((5, 3), (9, 2)):  # the exported shape, and other batch and sequence sizes
        x = _x(config, T, B, seed=T)
        hx = _hx(config, B, seed=B, cell=cell) if with_hx else None
        feeds = [x] + ([] if hx is None else list(hx) if cell == "lstm" else [hx])
        outputs = session.run(None, {n: t.numpy() for n, t in zip(names, feeds)})
        with torch.no_grad():
            expected_outputs = _flat(reference(x, hx))
        assert len(outputs) == len(expected_outputs)
        for got, expected in zip(outputs, expected_outputs):
            assert got.shape == tuple(expected.shape)
            np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_projection_cannot_be_exported_and_says_why():
    fused = FusedLSTM(I, H, proj_size=3).eval()
    with pytest.raises(Exception, match="proj_size > 0 cannot be exported to ONNX"):
        _export(fused, (torch.randn(5, 3, I),), None)


@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_input_cannot_be_exported_and_says_why(cell):
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = CELLS[cell][1](I, H)

        def forward(self, x, lengths):
            return self.rnn(pack_padded_sequence(x, lengths))[0].data

    with pytest.raises(Exception, match=f"PackedSequence input cannot be exported to ONNX.*{CELLS[cell][2]}"):
        _export(Packed().eval(), (torch.randn(5, 2, I), torch.tensor([5, 3])), None)


@pytest.mark.parametrize("cell", list(CELLS))
def test_resets_cannot_be_exported_and_say_why(cell):
    class WithResets(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = CELLS[cell][1](I, H)

        def forward(self, x, resets):
            return self.rnn(x, resets=resets)[0]

    with pytest.raises(Exception, match="resets inside a sequence cannot be exported to ONNX"):
        _export(WithResets().eval(), (torch.randn(5, 2, I), torch.zeros(5, 2, dtype=torch.bool)), None)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_export_round_trip_matches_eager(backend):
    torch.manual_seed(0)
    fused = FusedLSTM(I, H, num_layers=2, bidirectional=True, backend=backend)
    x = torch.randn(5, 3, I)
    program = torch.export.export(fused, (x,), dynamic_shapes=({0: torch.export.Dim("time"), 1: torch.export.Dim("batch")},))
    assert any("native_lstm" in str(n.target) for n in program.graph.nodes)
    for shape in ((5, 3, I), (7, 2, I)):
        x = torch.randn(shape)
        out, (h, c) = program.module()(x)
        expected, (eh, ec) = fused(x)
        for a, e in ((out, expected), (h, eh), (c, ec)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_torch_jit_script_names_torch_export():
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(FusedLSTM(I, H))


def test_torchscript_exporter_writes_lstm_too():
    """dynamo=False traces torch's own aten::lstm (the CPU native path), which it exports as ONNX LSTM."""
    import io

    torch.manual_seed(0)
    lstm = nn.LSTM(I, H, num_layers=2).eval()
    fused = FusedLSTM.from_torch(lstm).eval()
    buffer = io.BytesIO()
    x = torch.randn(5, 3, I)
    torch.onnx.export(fused, (x,), buffer, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    assert [n.op_type for n in model.graph.node].count("LSTM") == 2
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, lstm(x)[0].detach().numpy(), rtol=1e-5, atol=1e-6)
