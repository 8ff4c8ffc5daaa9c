"""The ``mmray`` command line: one small module per verb, no logic a library user would need.

The entry point is :func:`mmray.cli.main.main`; everything a verb does is callable from the library
(``mmray.fit``, ``mmray.tune_job``, ``mmray.evaluate``, ...), so nothing here is meant for import.
"""

__all__: list[str] = []
