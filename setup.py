"""ijepa-fast: installs the engine (ijepa_fast), its Triton kernels (kernels/ as ijepa_fast.kernels)
and its built-in configs (configs/ as ijepa_fast/configs). Nothing is compiled here: the C++
extension in csrc/ is built at first use and cached, with a pure-Python fallback."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version = {}
for line in (ROOT / "ijepa_fast" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        version["v"] = line.split("=")[1].strip().strip('"')

setup(
    name="ijepa-fast",
    version=version["v"],
    description="A kernel-optimised engine for I-JEPA pretraining",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["ijepa_fast", "ijepa_fast.models", "ijepa_fast.masks", "ijepa_fast.data", "ijepa_fast.kernels",
              "ijepa_fast.configs", "ijepa_fast.csrc"],
    package_dir={"ijepa_fast": "ijepa_fast", "ijepa_fast.kernels": "kernels", "ijepa_fast.configs": "configs",
                 "ijepa_fast.csrc": "csrc"},
    package_data={"ijepa_fast.configs": ["*.yaml"], "ijepa_fast.csrc": ["*.cpp"]},
    install_requires=["torch>=2.4", "pyyaml>=6", "pillow>=9", "numpy", "tqdm", "safetensors", "matplotlib"],
    extras_require={
        "test": ["pytest>=7", "triton>=3.2"],  # the kernel tests run under Triton's interpreter on CPU
        "triton": ["triton>=3.2"],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["ijepa-fast=ijepa_fast.cli:main"]},
)
