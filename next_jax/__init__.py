"""next_jax: NExt (low-rank trajectory extrapolation for RLVR) in pure JAX.

The process environment every entry point wants, set once here, before numpy, JAX or transformers load
(a value the user already exported wins):
    OPENBLAS_NUM_THREADS=1              OpenBLAS (numpy, JAX's CPU QR/SVD) busy-waits its threads: on a
                                        small or shared machine a 256×128 QR then takes seconds, not ms
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1 transformers' "PyTorch was not found" advice: we use it for
                                        configs and tokenizers only and never want torch
"""

import os

for _name, _value in (("OPENBLAS_NUM_THREADS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
  os.environ.setdefault(_name, _value)
