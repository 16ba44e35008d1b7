"""Deployment helpers: TLS certificates and SuperNode authentication keys for Flower."""
