"""Aggregation of adapter updates on Flower's Strategy API."""
