"""The host program tests/cuda_host/plan_dump.cpp, compiled over csrc/fused/fused_plan.cuh (or over a
changed copy of it, for a mutant): the fused kernels' plan and index arithmetic as JSON."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def compile_plan_dump(out_dir: Path, include_dir: Path = ROOT / "csrc") -> Optional[Callable[..., dict]]:
    """``run(B, H, elem=2, P=None) -> dict``, or None without a host C++ compiler. ``include_dir``: the csrc/
    directory (a mutant's copy holds its header at ``include_dir / "fused" / "fused_plan.cuh"``)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    exe = Path(out_dir) / "plan_dump"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{include_dir}", str(ROOT / "tests/cuda_host/plan_dump.cpp"),
                    "-o", str(exe)], check=True)
    cache: dict = {}

    def run(B: int, H: int, elem: int = 2, P: Optional[int] = None) -> dict:
        key = (B, H, elem, P)
        if key not in cache:
            args = [str(B), str(H), str(elem)] + ([str(P)] if P is not None else [])
            cache[key] = json.loads(subprocess.run([str(exe), *args], capture_output=True, text=True,
                                                   check=True).stdout)
        return cache[key]

    return run


def compile_mutant_plan_dump(out_dir: Path, site: str, replacement: str) -> Optional[Callable[..., dict]]:
    """compile_plan_dump over a copy of fused_plan.cuh (in ``out_dir``) whose one ``site`` reads ``replacement``:
    a mutant plan that a check must catch. None without a host C++ compiler."""
    header = (ROOT / "csrc" / "fused" / "fused_plan.cuh").read_text()
    assert header.count(site) == 1, f"the mutant's site is no longer in fused_plan.cuh once: {site!r}"
    (Path(out_dir) / "fused").mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "fused" / "fused_plan.cuh").write_text(header.replace(site, replacement))
    return compile_plan_dump(out_dir, include_dir=Path(out_dir))
