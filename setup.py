"""Package layout for setuptools (the metadata is in pyproject.toml).

Every package under ijepa_fast/ is found automatically; the top-level folders of the design card
install inside it: kernels/ as ijepa_fast.kernels (with any sub-packages; kernels/ has no __init__.py,
see kernels/README.md), configs/ as
ijepa_fast.configs (the built-in YAML recipes) and csrc/ as ijepa_fast.csrc (the C++ sources the
extension is compiled from at first use). Nothing is compiled at install time.
"""
from setuptools import find_packages, setup

MAPPED = {"ijepa_fast.kernels": "kernels", "ijepa_fast.configs": "configs", "ijepa_fast.csrc": "csrc"}

packages = find_packages(include=["ijepa_fast", "ijepa_fast.*"])
packages += ["ijepa_fast.kernels." + p for p in find_packages("kernels")]
packages += list(MAPPED)

setup(
    packages=packages,
    package_dir={"ijepa_fast": "ijepa_fast", **MAPPED,
                 **{"ijepa_fast.kernels." + p: "kernels/" + p.replace(".", "/") for p in find_packages("kernels")}},
    package_data={"ijepa_fast.configs": ["*.yaml"], "ijepa_fast.csrc": ["*.cpp", "*.h", "*.cu"]},
)
