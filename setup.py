"""Build for f2l.

Pure-Python install by default. The CUDA extension ``f2l_kernels._C`` (sources in
``csrc/``) is built only when a CUDA toolkit and a CUDA build of torch are present in the
build environment, or when ``F2L_BUILD_CUDA=1``; ``F2L_SKIP_CUDA_BUILD=1`` always skips it.
Environment flags are documented in ``docs/ENV.md``.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    with open(os.path.join(HERE, "f2l_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in f2l_kernels/__init__.py")


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _gencode_flags(spec):
    """nvcc -gencode flags for ``F2L_CUDA_ARCHS`` ("80;90", "8.0 9.0", "90a"), plus PTX
    for the newest listed arch so that newer GPUs can JIT the kernels."""
    archs = []
    for tok in spec.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower().replace("sm_", "").replace(".", "")
        if not tok:
            continue
        if not (tok.rstrip("a").isdigit() and len(tok.rstrip("a")) >= 2):
            raise RuntimeError(f"F2L_CUDA_ARCHS: expected compute capabilities like '80;90' or '9.0', got {spec!r}")
        if tok not in archs:
            archs.append(tok)
    if not archs:
        raise RuntimeError(f"F2L_CUDA_ARCHS: no architecture in {spec!r}")
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(archs, key=lambda a: int(a.rstrip("a")))
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def _cuda_extensions():
    """Return (ext_modules, cmdclass) for the optional CUDA extension ``f2l_kernels._C``.

    Built when a CUDA toolkit and a CUDA build of torch are present, or when
    ``F2L_BUILD_CUDA=1`` (then a missing toolkit is an error); ``F2L_SKIP_CUDA_BUILD=1``
    always skips it. Without it, the decode LoRA path runs on Triton.
    """
    if _flag("F2L_SKIP_CUDA_BUILD"):
        return [], {}
    forced = _flag("F2L_BUILD_CUDA")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:
        if forced:
            raise RuntimeError("F2L_BUILD_CUDA=1 but torch is not importable in the build environment "
                               f"({e}); use `pip install --no-build-isolation -e .`") from e
        return [], {}
    if not forced and (CUDA_HOME is None or torch.version.cuda is None):
        return [], {}
    if torch.version.cuda is None:
        raise RuntimeError(f"F2L_BUILD_CUDA=1 but the installed torch ({torch.__version__}) is a CPU-only build; "
                           "the extension links against torch's CUDA libraries: install a CUDA build of torch")
    if CUDA_HOME is None:
        raise RuntimeError("F2L_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    csrc = os.path.join(HERE, "csrc")
    srcs = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp")))
    # ninja's default parallelism can exhaust memory on small build machines: cap it
    # unless the user chose a value (torch's BuildExtension reads MAX_JOBS).
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    ext = CUDAExtension(
        name="f2l_kernels._C",
        sources=srcs,
        include_dirs=[csrc],
        # No -std here: torch adds the standard its headers need (C++17 or C++20).
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + _gencode_flags(os.environ.get("F2L_CUDA_ARCHS", "80;90")),
        },
    )
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
    package_data={"f2l": ["configs/*.json", "assets/tiny_seeing/*"], "f2l_kernels": ["tuned/*.json"]},
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
