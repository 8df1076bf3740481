"""The package layout; the metadata is in pyproject.toml.

kernels/ is installed as dampopt.kernels and reference/ as dampopt.reference: an unrelated PyPI
package owns the top-level name "kernels", so nothing named kernels (or reference) may land at
the top of site-packages.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["dampopt", "dampopt.*"]), "dampopt.kernels",
              "dampopt.reference"],
    package_dir={"dampopt": "dampopt", "dampopt.kernels": "kernels",
                 "dampopt.reference": "reference"},
)  # fmt: skip
