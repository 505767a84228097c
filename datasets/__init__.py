"""Datasets: one module per dataset."""
