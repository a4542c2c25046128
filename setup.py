"""Only job: ship the top-level conf/ directory inside the package as ``cogvx_train.conf``.

Everything else lives in pyproject.toml. The package list is computed here because
setuptools' automatic discovery cannot add a package mapped from another directory.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["cogvx_train", "cogvx_train.*"]) + ["cogvx_train.conf"])
