"""The strategy names accepted by ``RunConfig.strategy`` and ``--strategy`` (no imports)."""

STRATEGIES = ("fedavg", "ffa-lora", "exact", "median", "trimmed-mean", "fedprox", "fedadam",
              "fedyogi")
