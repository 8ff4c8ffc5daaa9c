"""Hyperparameter sweeps: search-space YAML, Ray Tune + Optuna, leaderboard, HParams and the best export."""
