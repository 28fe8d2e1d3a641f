"""Packaging: `kernels/` lives at the top of the repository but installs as `fastadv_kernels`.

The folder has no `__init__.py`: a Python started in the clone's root (`python -c`, `python -m`, a notebook)
has that root first on sys.path, and a regular package named `kernels` there would stand in for Hugging
Face's `kernels`, which transformers imports. A folder without `__init__.py` is only a namespace portion, and
Python takes a regular package of the same name anywhere on sys.path before it. Installed, the folder is the
namespace package `fastadv_kernels`, a name nothing else uses, for regular and editable installs alike
(setuptools' editable finder resolves a top-level namespace package mapped elsewhere; not a subpackage).
"""

from setuptools import find_packages, setup

setup(
    # Every package under fastadv/ (a new subpackage ships without being listed here), and the kernels.
    packages=[*find_packages(include=["fastadv", "fastadv.*"]), "fastadv_kernels"],
    package_dir={"fastadv": "fastadv", "fastadv_kernels": "kernels"},
)
