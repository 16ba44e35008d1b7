"""The strategy names accepted by ``RunConfig.strategy`` and ``--strategy`` (no imports)."""

STRATEGIES = ("fedavg", "ffa-lora", "exact", "median", "trimmed-mean", "fedprox", "fedadam",
              "fedyogi")

# dtypes adapter tensors may travel in (``RunConfig.wire_dtype``, :mod:`strategies.wire`).
WIRE_DTYPES = ("float32", "bfloat16", "float16")
