"""Studies and benchmarks. Importing next_jax first sets the process environment (next_jax/__init__.py)
before any study imports numpy or JAX."""

import next_jax  # noqa: F401
