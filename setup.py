"""Packaging: `kernels/` lives at the top of the repository but installs as `fastadv.kernels`.

A top-level module named `kernels` could clash with any other package, so the directory is mapped
into the package for regular and editable installs alike.
"""

from setuptools import find_packages, setup

setup(
    # Every package under fastadv/ (a new subpackage ships without being listed here), and the kernels.
    packages=[*find_packages(include=["fastadv", "fastadv.*"]), "fastadv.kernels"],
    package_dir={"fastadv": "fastadv", "fastadv.kernels": "kernels"},
)
