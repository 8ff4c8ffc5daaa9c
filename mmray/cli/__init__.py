"""The ``mmray`` command line: one small module per verb, no logic a library user would need."""
