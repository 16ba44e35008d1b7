"""fedadapt: federated, private, continual adaptation of medical imaging foundation models.

Everything installs under this one package. The repository keeps its subpackages as
top-level folders (``server/``, ``client/``, ``strategies/``, ...), which setuptools
maps onto ``fedadapt.server``, ``fedadapt.client``, ... when it builds a wheel
(``pyproject.toml``, ``[tool.setuptools.package-dir]``).

A source tree used in place — a checkout on ``sys.path`` or the app bundle that
``flwr run .`` unpacks for the SuperLink — has no ``fedadapt/server/`` folder, so the
repository root joins this package's search path. An installed wheel has the
subpackages inside ``fedadapt/`` and never takes that branch.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

#: The folders of the repository root that are subpackages of ``fedadapt``.
SUBPACKAGES = (
    "server",
    "client",
    "strategies",
    "privacy",
    "simulations",
    "continual",
    "imaging",
    "report",
    "deploy",
)

_here = _Path(__file__).resolve().parent
_root = _here.parent
if not (_here / "server").is_dir() and (_root / "pyproject.toml").is_file() and all(
    (_root / name / "__init__.py").is_file() for name in SUBPACKAGES
):
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821
del _here, _root
