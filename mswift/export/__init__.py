"""Export: from mswift checkpoints to serving checkpoints (16-bit, INT4 / INT8 / FP8)."""
