"""The presets' shared config: the schema itself lives in the library, next_jax/config.py (validation needs it
wherever the package is installed); presets import it from here as `common`."""

from next_jax.config import ALGOS, apply_algo, base, parse_arg  # noqa: F401
