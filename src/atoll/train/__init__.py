"""Pre-training: the loop, its schedule and its checkpoints."""
