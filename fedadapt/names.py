"""Names the run config accepts for components of the floors above (no imports).

The core (:mod:`fedadapt.config`) validates a run config against these, and the
packages that implement them (``strategies``) import them from here; so do the few
constants that the server and the sites must agree on.
"""

from typing import Final

STRATEGIES: Final = ("fedavg", "ffa-lora", "exact", "median", "trimmed-mean", "fedprox",
                     "fedadam", "fedyogi", "scaffold")

# The heavy-ball momentum of every site's local SGD (``client.train.train``); the
# ``scaffold`` server must know it to turn an update into a mean gradient.
SGD_MOMENTUM: Final = 0.9

# Strategies with a server optimiser whose learning rate ``server-lr`` sets (Flower's
# FedAdam / FedYogi, Reddi et al. ICLR 2021).
SERVER_OPT: Final = ("fedadam", "fedyogi")

# dtypes adapter tensors may travel in (``RunConfig.wire_dtype``, :mod:`strategies.wire`).
WIRE_DTYPES: Final = ("float32", "bfloat16", "float16")

# Strategies whose aggregate is a (weighted) sum of the sites' updates, so that secure
# aggregation can compute it without seeing any one of them (``secure-aggregation``).
SECAGG_STRATEGIES: Final = ("fedavg", "ffa-lora", "fedprox")

# Integer noise each site may add under secure aggregation (``secagg-noise``): none, or
# its share of Skellam noise (Agarwal, Kairouz & Liu, NeurIPS 2021).
SECAGG_NOISES: Final = ("none", "skellam")
