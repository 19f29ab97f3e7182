"""Build script: the Python package, plus the optional CUDA extension ``lstm_kernels._C``.

The extension is built by CMake (CMakeLists.txt) with nvcc and pybind11. It does
not link libtorch, so it needs no GPU and no particular torch to build. Without
nvcc the package installs without it and the ``cuda`` backend reports itself
unavailable.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


#: Written next to the extension by every build: whether the CUDA extension was built, and why not
#: (read by ``python -m lstm_kernels.build_info``, which ``make install`` runs).
BUILD_INFO = "_build_info.json"


class CMakeBuild(build_ext):
    def run(self):
        out_dir = Path(self.get_ext_fullpath("lstm_kernels._C")).resolve().parent
        if os.environ.get("LSTM_KERNELS_SKIP_CUDA") == "1":
            self._without_cuda(out_dir, "LSTM_KERNELS_SKIP_CUDA=1 was set at build time")
            return
        nvcc = find_nvcc()
        if nvcc is None:
            self._without_cuda(out_dir, "nvcc was not found at build time (put it on PATH or set CUDA_HOME)")
            return
        self.nvcc = nvcc
        super().run()
        architectures = os.environ.get("CMAKE_CUDA_ARCHITECTURES", "80;90")
        _write_build_info(out_dir, {"cuda_extension": True, "nvcc": nvcc, "architectures": architectures})
        print(f"lstm_kernels: built the CUDA backend with {nvcc} for CUDA architectures {architectures}")

    def _without_cuda(self, out_dir: Path, reason: str) -> None:
        """No extension this time: an earlier build's _C must not ship or load in its place."""
        for stale in out_dir.glob("_C.*"):
            stale.unlink()
        _write_build_info(out_dir, {"cuda_extension": False, "reason": reason})
        print(f"lstm_kernels: building without the CUDA backend: {reason}")

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLSTM_KERNELS_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            config.append("-GNinja")
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            config.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *config])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])


def _write_build_info(out_dir: Path, info: dict) -> None:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILD_INFO).write_text(json.dumps(info) + "\n")


setup(
    name="lstm_kernels",
    version="0.1.0",
    description="Fused LSTM forward and backward kernels (CUDA and Triton) for PyTorch",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    packages=find_packages(include=["lstm_kernels", "lstm_kernels.*"]),
    package_data={"lstm_kernels": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.16", "numpy"],
    # Triton 3.6 is the one torch 2.11 pins (and the oldest that compiles the persistent kernels); 3.9 the
    # newest tested: `make test` compiles the kernels and runs them under the interpreter with both ends.
    extras_require={"triton": ["triton>=3.6,<3.10"], "bench": ["matplotlib", "tqdm", "pytest-benchmark"]},
    entry_points={"console_scripts": ["lstm-kernels = lstm_kernels.__main__:main"]},
    ext_modules=[CMakeExtension("lstm_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
