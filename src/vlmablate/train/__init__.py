"""Training: the Trainer subclass (optimizer groups, selective saving, gradient audit) and the runner."""
