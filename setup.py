"""Build for f2l.

Pure-Python install by default. The CUDA extension ``f2l_kernels._C`` (sources in
``csrc/``) is built only when a CUDA toolkit and a CUDA build of torch are present in the
build environment, or when ``F2L_BUILD_CUDA=1``; ``F2L_SKIP_CUDA_BUILD=1`` always skips it.
Environment flags are documented in ``docs/ENV.md``.
"""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    with open(os.path.join(HERE, "f2l_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in f2l_kernels/__init__.py")


def _cuda_extensions():
    """Return (ext_modules, cmdclass) for the optional CUDA extension."""
    if os.environ.get("F2L_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    forced = os.environ.get("F2L_BUILD_CUDA", "0") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        if forced:
            raise RuntimeError("F2L_BUILD_CUDA=1 but torch is not importable in the build environment "
                               "(use `pip install --no-build-isolation -e .`)")
        return [], {}
    if not forced and (CUDA_HOME is None or torch.version.cuda is None):
        return [], {}
    if CUDA_HOME is None:
        raise RuntimeError("F2L_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    archs = os.environ.get("F2L_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = []
    for a in filter(None, (x.strip() for x in archs)):
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    srcs = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc")) if f.endswith((".cu", ".cpp"))
    )
    ext = CUDAExtension(
        name="f2l_kernels._C",
        sources=srcs,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + gencode,
        },
    )
    # MAX_JOBS is honoured by torch's BuildExtension (ninja -j).
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="f2l",
    version=_read_version(),
    description="Fused kernels and a model layer for Frames2LoRA: videos to LoRA adapters for SmolVLM2",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["f2l", "f2l.*", "f2l_kernels", "f2l_kernels.*"]),
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system=='Linux'",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",
        "num2words",
    ],
    extras_require={
        "video": ["av>=12"],
        "peft": ["peft>=0.17"],
        "test": ["pytest>=8", "pytest-xdist", "pytest-benchmark", "hypothesis", "av>=12", "peft>=0.17"],
        "bench": ["pytest-benchmark"],
    },
    entry_points={"console_scripts": ["f2l=f2l.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
