"""lstm_kernels: fused LSTM forward and backward kernels for PyTorch.

``FusedLSTM`` is a drop-in ``torch.nn.LSTM``; ``LSTMLayer`` / ``lstm_layer`` run
one layer's recurrence on a chosen backend (see ``available_backends()``).
"""
from .backends import BackendUnsupportedError, available_backends, unavailable_backends
from .function import LSTMLayer, lstm_layer
from .module import FusedLSTM

__version__ = "0.1.0"

__all__ = [
    "BackendUnsupportedError",
    "FusedLSTM",
    "LSTMLayer",
    "available_backends",
    "lstm_layer",
    "unavailable_backends",
]
