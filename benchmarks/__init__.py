"""The benchmark suite of lstm_kernels: ``python -m benchmarks`` (see README.md here).

    configs.py    the sweep grid, filters, cuDNN-persistent eligibility, cost estimate
    providers.py  the implementations (FusedLSTM backends, nn.LSTM, torch.compile, flashrnn)
    timing.py     CUDA-event / CPU timers, rotated inputs, median/p10/p90, peak memory, budget
    memory.py     bytes a training forward saves for its backward (saved_tensors_hooks)
    runner.py     the sweep loop: skips instead of crashes
    report.py     CSV, Markdown, PNG, and the stdout table (print_table)
    (lstm_kernels/environment.py: device, driver, versions, commit: the header of every file)
    __main__.py   the command line
"""
from .report import format_summary, format_table, print_table, read_csv

__all__ = ["format_summary", "format_table", "print_table", "read_csv"]
