#!/usr/bin/env python3
"""Builds the native libraries of the kvq Python package and copies them into python/kvq/_lib (or --out).

  libkvq.so.0         the CMake target kvq_shared (CPU library, always)
  libkvq_cuda_py.so   the CUDA backend (CMake target kvq_cuda, a static library) linked into a shared library
                      against libkvq.so.0 and the static CUDA runtime, built as cuda_mode() says:
                      KVQ_CUDA=ON always (fails without nvcc), KVQ_CUDA=OFF (or --no-cuda) never, KVQ_CUDA=AUTO when
                      CMake finds nvcc; without KVQ_CUDA: AUTO on a machine with an NVIDIA GPU (`nvidia-smi -L`
                      succeeds or /dev/nvidia0 exists), else OFF. KVQ_CUDA_GENCODE overrides the nvcc -gencode flags.

Used by setup.py (pip install .) and runnable by hand: python3 python/build_native.py [--build-dir D] [-j N].
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd, **kw)


def cache_value(build_dir, key):
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            for line in f:
                m = re.match(rf"{re.escape(key)}:[A-Z]+=(.*)$", line.strip())
                if m:
                    return m.group(1)
    except OSError:
        pass
    return ""


def has_nvidia_gpu():
    if os.path.exists("/dev/nvidia0"):
        return True
    try:
        return subprocess.run(["nvidia-smi", "-L"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cuda_mode():
    """KVQ_CUDA from the environment (ON/OFF/AUTO), else AUTO where there is a GPU and OFF where there is none: the
    sm_90a kernels take minutes to compile, which a machine that merely has nvcc installed should not pay for."""
    env = os.environ.get("KVQ_CUDA", "").strip().upper()
    if env:
        if env not in ("ON", "OFF", "AUTO"):
            raise SystemExit(f"KVQ_CUDA={env!r}: expected ON, OFF or AUTO")
        return env
    return "AUTO" if has_nvidia_gpu() else "OFF"


def build(out_dir, build_dir=None, jobs=None, cuda=None):
    build_dir = os.path.abspath(build_dir or os.path.join(ROOT, "build-py"))
    jobs = str(jobs or os.environ.get("KVQ_BUILD_JOBS") or 2)
    if cuda is None:
        cuda = cuda_mode()
    print(f"kvq: KVQ_CUDA={cuda}", flush=True)
    cfg = ["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DKVQ_BUILD_MODEL=OFF",
           "-DKVQ_BUILD_TESTS=OFF", "-DKVQ_BUILD_BENCH=OFF", f"-DKVQ_CUDA={cuda}"]
    if os.environ.get("KVQ_CUDA_GENCODE"):
        cfg.append(f"-DKVQ_CUDA_GENCODE={os.environ['KVQ_CUDA_GENCODE']}")
    if os.environ.get("KVQ_CUDA_FAT"):  # the fat binary (src/cuda/CMakeLists.txt): sm_80 .. sm_100 + PTX
        cfg.append(f"-DKVQ_CUDA_FAT={os.environ['KVQ_CUDA_FAT']}")
    run(cfg, stdout=subprocess.DEVNULL)
    has_cuda = cuda != "OFF" and os.path.exists(os.path.join(build_dir, "src", "cuda"))
    targets = ["kvq_shared"] + (["kvq_cuda"] if has_cuda else [])
    run(["cmake", "--build", build_dir, "-j", jobs, "--target", *targets])
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "libkvq*.so*")):
        os.remove(old)
    core = os.path.realpath(os.path.join(build_dir, "src", "core", "libkvq.so"))
    shutil.copy2(core, os.path.join(out_dir, "libkvq.so.0"))  # the soname
    if has_cuda:
        static = os.path.join(build_dir, "src", "cuda", "libkvq_cuda.a")
        nvcc = cache_value(build_dir, "CMAKE_CUDA_COMPILER")
        libdir = cache_value(build_dir, "CUDAToolkit_LIBRARY_DIR") or os.path.join(
            os.path.dirname(os.path.dirname(nvcc)), "lib64")
        cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
        run([cxx, "-shared", "-o", os.path.join(out_dir, "libkvq_cuda_py.so"), "-Wl,--whole-archive", static,
             "-Wl,--no-whole-archive", os.path.join(out_dir, "libkvq.so.0"), f"-L{libdir}", "-lcudart_static",
             "-ldl", "-lrt", "-lpthread", "-Wl,-rpath,$ORIGIN"])
    return out_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "python", "kvq", "_lib"))
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("-j", "--jobs", default=None)
    ap.add_argument("--no-cuda", action="store_true")
    a = ap.parse_args()
    build(a.out, a.build_dir, a.jobs, "OFF" if a.no_cuda else None)
    print("kvq native libraries in", a.out, ":", sorted(os.listdir(a.out)))


if __name__ == "__main__":
    sys.exit(main())
