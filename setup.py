"""Packaging: `kernels/` lives at the top of the repository but installs as `fastadv.kernels`.

A top-level module named `kernels` could clash with any other package, so the directory is mapped
into the package for regular and editable installs alike.
"""

from setuptools import setup

setup(
    packages=["fastadv", "fastadv.ops", "fastadv.methods", "fastadv.integrations", "fastadv.kernels"],
    package_dir={"fastadv": "fastadv", "fastadv.kernels": "kernels"},
)
