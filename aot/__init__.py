"""Ahead-of-time compilation: training and serving programs for any topology, from shapes alone."""
