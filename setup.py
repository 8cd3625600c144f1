"""pip install . / pip wheel . / pip install -e . : builds libkvq (CMake target kvq_shared) and, where asked or where a
GPU is present, the CUDA backend, then installs the Python package kvq from python/kvq with the libraries in
kvq/_lib (an editable install puts them into python/kvq/_lib of the source tree).

CUDA rule (python/build_native.py, cuda_mode()): KVQ_CUDA=ON builds the CUDA backend (fails without nvcc),
KVQ_CUDA=OFF never does, KVQ_CUDA=AUTO builds it when CMake finds nvcc. Without KVQ_CUDA the mode is AUTO when the
machine has an NVIDIA GPU (`nvidia-smi -L` succeeds or /dev/nvidia0 exists) and OFF otherwise: nvcc alone does not
make pip spend minutes on kernels for a GPU the machine does not have. KVQ_CUDA_GENCODE overrides the nvcc -gencode
flags (default sm_90a + sm_80 + compute_80 PTX; KVQ_CUDA_FAT=ON: the fat binary). Other environment: KVQ_BUILD_JOBS (parallel build jobs, default 2),
KVQ_BUILD_DIR (the CMake build directory, default build-py)."""
import os
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "python"))
import build_native  # noqa: E402


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        # an editable install imports kvq from python/kvq, so the libraries go there; otherwise into the wheel's tree
        if getattr(self, "editable_mode", False):
            out = os.path.join(ROOT, "python", "kvq", "_lib")
        else:
            out = os.path.join(self.build_lib, "kvq", "_lib")
        build_native.build(out, os.environ.get("KVQ_BUILD_DIR"))


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # platform wheel: it carries shared libraries
        return True


# setuptools' own build tree and egg-info live under build-py/ next to the CMake build, not in build/ (the README's
# CMake build directory). egg_info refuses an egg_base that does not exist yet, hence the makedirs.
os.makedirs(os.path.join(ROOT, "build-py"), exist_ok=True)
setup(cmdclass={"build_py": BuildPyWithNative}, distclass=BinaryDistribution,
      options={"build": {"build_base": os.path.join("build-py", "setuptools")}, "egg_info": {"egg_base": "build-py"}})
