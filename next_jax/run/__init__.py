"""One run, from a config to its results: the state machine (COLLECT → EXTRAPOLATE → CONTINUE), the
driver's primitives (fork, advance, jump, skip_jump, run), config → validate → build (experiment), the
run's directory (workdir), the memory plan (memory), and the toy base model (toy_base). The top library
layer: the commands (next_jax.cli) and presets (next_jax.configs) stand on it."""
