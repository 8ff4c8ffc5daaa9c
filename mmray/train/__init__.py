"""Training: the per-worker loop, metrics, checkpoints and the thin Ray Train wrapper."""
