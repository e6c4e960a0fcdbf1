"""Training: the resumable trainer, its run directory and its metrics log."""
