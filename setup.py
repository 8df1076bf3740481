from setuptools import find_packages, setup

# kernels/ is installed as dampopt.kernels: an unrelated PyPI package owns the top-level name
# "kernels", so nothing named kernels may land at the top of site-packages.
setup(
    name="dampopt",
    version="0.1.0",
    description="Physics-based optimizers and surgical layer repair for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dampopt", "dampopt.*"]) + ["dampopt.kernels"],
    package_dir={"dampopt": "dampopt", "dampopt.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
        "reference": ["torchvision", "matplotlib", "scipy"],
    },
)
