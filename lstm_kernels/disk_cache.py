"""A JSON file in the user's cache directory that remembers what this machine measured.

Verification's verdicts (lstm_kernels/verification.py) and the measured choice of a path
(lstm_kernels/autotune.py) each keep one file, ``{environment key: {"environment": {...},
"entries": {key: value}}}``: an entry holds only under the environment it was measured in
(package, torch, Triton and driver versions, a hash of the kernel sources), so an upgrade measures
again. The file is read once per environment and process; a write merges one entry and replaces
the file atomically; a file that cannot be read or written leaves the entry in the process only.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

CACHE_DIR_ENV = "LSTM_KERNELS_CACHE_DIR"


def cache_dir() -> Path:
    """LSTM_KERNELS_CACHE_DIR, else $XDG_CACHE_HOME/lstm_kernels, else ~/.cache/lstm_kernels."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lstm_kernels"


class DiskCache:
    """The entries of one cache file, per environment key.

    ``decode(value)`` turns a stored JSON value back into an entry (raising TypeError or ValueError
    for one this module did not write, which is then skipped); ``encode(entry)`` the reverse.
    """

    def __init__(self, file_name: str, decode: Callable = lambda v: v, encode: Callable = lambda e: e):
        self.file_name = file_name
        self._decode = decode
        self._encode = encode
        self._read: dict = {}  # environment key -> {key: entry}, as read from the file

    @property
    def path(self) -> Path:
        return cache_dir() / self.file_name

    def _load(self) -> dict:
        """The file's contents, or {} where it is missing, unreadable or not what this module writes."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def entries(self, env_key: str) -> dict:
        """{key: entry} stored under ``env_key`` (read from the file once per process)."""
        if env_key not in self._read:
            entries = {}
            stored = self._load().get(env_key)
            if isinstance(stored, dict) and isinstance(stored.get("entries"), dict):
                for key, value in stored["entries"].items():
                    try:
                        entries[key] = self._decode(value)
                    except (TypeError, ValueError):
                        continue  # an entry this module did not write: measure again
            self._read[env_key] = entries
        return self._read[env_key]

    def get(self, env_key: str, key: str):
        return self.entries(env_key).get(key)

    def put(self, env_key: str, environment: dict, key: str, entry) -> None:
        """Merge one entry into the file; a file that cannot be written keeps it in this process only."""
        data = self._load()
        stored = data.get(env_key)
        if not (isinstance(stored, dict) and isinstance(stored.get("entries"), dict)):
            stored = data[env_key] = {"environment": environment, "entries": {}}
        stored["entries"][key] = self._encode(entry)
        self.entries(env_key)[key] = entry
        tmp_name: Optional[str] = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                tmp_name = tmp.name
                json.dump(data, tmp, indent=1, sort_keys=True)
            os.replace(tmp_name, self.path)
        except (OSError, TypeError, ValueError):
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)

    def clear(self, disk: bool = False) -> None:
        """Forget what was read (and, with ``disk``, delete the file)."""
        self._read.clear()
        if disk:
            with contextlib.suppress(OSError):
                self.path.unlink()
