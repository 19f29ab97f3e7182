"""lstm_kernels: fused LSTM forward and backward kernels for PyTorch.

``FusedLSTM`` is a drop-in ``torch.nn.LSTM`` and ``FusedGRU`` one for ``torch.nn.GRU``;
``LSTMLayer`` / ``lstm_layer`` (and ``gru_layer``) run one layer's recurrence on a chosen backend
(see ``available_backends()``).
"""
__version__ = "0.1.0"

from .backends import BackendUnsupportedError, available_backends, unavailable_backends  # noqa: E402
from .function import LSTMLayer, gru_layer, lstm_layer  # noqa: E402
from .module import FusedLSTM  # noqa: E402
from .gru_module import FusedGRU  # noqa: E402
from . import verification  # noqa: E402,F401  (installs verification before first use in dispatch)

__all__ = [
    "BackendUnsupportedError",
    "FusedGRU",
    "FusedLSTM",
    "LSTMLayer",
    "available_backends",
    "gru_layer",
    "lstm_layer",
    "unavailable_backends",
]
