"""The training driver: build, step, checkpoint, loop."""
