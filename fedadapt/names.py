"""Names the run config accepts for components of the floors above (no imports).

The core (:mod:`fedadapt.config`) validates a run config against these, and the
packages that implement them (``strategies``) import them from here.
"""

from typing import Final

STRATEGIES: Final = ("fedavg", "ffa-lora", "exact", "median", "trimmed-mean", "fedprox",
                     "fedadam", "fedyogi")

# dtypes adapter tensors may travel in (``RunConfig.wire_dtype``, :mod:`strategies.wire`).
WIRE_DTYPES: Final = ("float32", "bfloat16", "float16")
