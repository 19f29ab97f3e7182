"""The README's usage snippets run as written (each in a fresh namespace)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
            if "from lstm_kernels import" in block]


def test_the_usage_section_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
    if "h_all" in namespace:
        T, B, H = namespace["T"], namespace["B"], namespace["H"]
        assert tuple(namespace["h_all"].shape) == (T, B, H)
        assert tuple(namespace["h_T"].shape) == (B, H) and tuple(namespace["c_T"].shape) == (B, H)
