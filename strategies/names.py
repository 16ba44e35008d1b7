"""The strategy names accepted by ``RunConfig.strategy`` and ``--strategy``.

Defined in the core (:mod:`fedadapt.names`) so that the run config does not import this
package; re-exported here for the strategies that implement them.
"""

from fedadapt.names import STRATEGIES, WIRE_DTYPES

__all__ = ["STRATEGIES", "WIRE_DTYPES"]
