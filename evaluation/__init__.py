"""Evaluation: the metric protocols (WIDER mAP, the PETA metrics in two conventions), loading a trained
model from any source, scoring and reporting a split, and the figures."""
