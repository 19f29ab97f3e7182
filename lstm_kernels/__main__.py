"""``python -m lstm_kernels <command>``; the commands: ``check`` (see :mod:`lstm_kernels.check`)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {"check": "verify every backend this machine can run, time it against nn.LSTM, write a report"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m lstm_kernels <command> [options]  (lstm-kernels <command>)\ncommands:")
        for name, what in COMMANDS.items():
            print(f"  {name:8s} {what}")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from .check import main as check_main

    return check_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
