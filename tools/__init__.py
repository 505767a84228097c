"""Commands beyond train / eval / predict (each runs as ``python tools/<name>.py``), and the authors'
execution style as a reference (``upstream_reference``)."""
