"""Training jobs: shared assets and conditioning, optimisers, checkpoints, the teacher and DMD loops."""
