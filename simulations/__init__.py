"""Simulated federations of hospitals on Flower's Simulation Engine."""
