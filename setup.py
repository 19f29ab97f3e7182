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


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("LSTM_KERNELS_SKIP_CUDA") == "1":
            print("lstm_kernels: LSTM_KERNELS_SKIP_CUDA=1; building without the CUDA backend")
            return
        nvcc = find_nvcc()
        if nvcc is None:
            print("lstm_kernels: nvcc not found; building without the CUDA backend (set CUDA_HOME to build it)")
            return
        self.nvcc = nvcc
        super().run()

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


setup(
    name="lstm_kernels",
    version="0.1.0",
    description="Fused LSTM forward and backward kernels (CUDA and Triton) for PyTorch",
    packages=find_packages(include=["lstm_kernels", "lstm_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    # Triton 3.3 is the first with cooperative launches (the persistent kernels' launch_cooperative_grid);
    # 3.9 the newest tested: `make test` runs the Triton kernels under the interpreter with both ends.
    extras_require={"triton": ["triton>=3.3,<3.10"], "bench": ["matplotlib", "tqdm", "pytest-benchmark"]},
    ext_modules=[CMakeExtension("lstm_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
