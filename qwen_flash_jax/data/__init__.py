"""Data: the procedural toy world, dataset sources and the grain pipeline."""
