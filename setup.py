from setuptools import find_packages, setup

DEV = [
    "pytest>=8",
    "pytest-benchmark>=4",
    "nvidia-dali-cuda130",
    "onnx",
    "onnxruntime",
    "ruff",
]

setup(
    name="avgn_fast",
    version="0.1.0",
    description="Triton-accelerated inference toolkit for the Audio-Visual Glance Network (AVGN)",
    python_requires=">=3.10",
    packages=find_packages(include=["avgn_fast", "avgn_fast.*"]) + ["avgn_fast.kernels"],
    package_dir={"avgn_fast.kernels": "kernels"},
    # torch is deliberately unpinned: on a CPU machine install the CPU wheel first (see README),
    # so this requirement is already met and pip never fetches a CUDA build.
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "av<19", "fvcore", "tqdm", "matplotlib"],
    extras_require={"dev": DEV, "tensorrt": ["torch-tensorrt"], "ray": ["ray[data]"]},
    # the console script enters outside the package, so that --help does not import torch (avgn_fast_cli.py)
    py_modules=["avgn_fast_cli"],
    entry_points={"console_scripts": ["avgn-fast=avgn_fast_cli:main"]},
)
