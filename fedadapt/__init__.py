"""fedadapt: federated, private, continual adaptation of medical imaging foundation models."""

__version__ = "0.1.0"
