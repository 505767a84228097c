"""What every other part of the project stands on, importing nothing of it: the presets' table (what can
be built and trained), one-line user errors, the machine line with the thread settings, and temporary
file names."""
