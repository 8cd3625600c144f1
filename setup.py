"""pip install . : builds libkvq (CMake target kvq_shared) and, when nvcc is found, the CUDA backend, then installs
the Python package kvq from python/kvq with the libraries in kvq/_lib. Environment: KVQ_CUDA=OFF skips CUDA,
KVQ_BUILD_JOBS sets the parallel build jobs (default 2), KVQ_BUILD_DIR the CMake build directory (default build-py)."""
import os
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "python"))
import build_native  # noqa: E402


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        out = os.path.join(self.build_lib, "kvq", "_lib")
        build_native.build(out, os.environ.get("KVQ_BUILD_DIR"))


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # platform wheel: it carries shared libraries
        return True


setup(cmdclass={"build_py": BuildPyWithNative}, distclass=BinaryDistribution,
      options={"build": {"build_base": "build-py/setuptools"}, "egg_info": {"egg_base": "build-py"}})
