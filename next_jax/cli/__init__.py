"""The commands a user runs, installed as console scripts (setup.py) and runnable from any directory as
`python -m next_jax.cli.<command>`:

    next-jax-run          cli/run.py          train one config (`--config=<preset or file>[:arg]`)
    next-jax-posthoc      cli/posthoc.py      NExt on the checkpoints of a finished TRL/verl/PEFT run
    next-jax-convert      cli/convert.py      convert a model (HF folder, GGUF) once into the cache
    next-jax-evaluate     cli/evaluate.py     accuracy of a model on the math benchmarks
    next-jax-memory-plan  cli/memory_plan.py  per-device memory of a config on a mesh, without devices
    (python -m only)      cli/toy_base.py     build the toy base model (make demo does it when missing)
"""
