"""The fedadapt ServerApp: strategy, rounds, refusals, evaluation, run directory."""
