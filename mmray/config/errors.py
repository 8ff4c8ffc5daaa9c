"""The user-fixable errors, under the config package where callers have always found them.

They live in :mod:`mmray.errors` (which imports nothing), so components below the config (encoders,
fusions, data) raise them without importing the package whose schema is assembled from them.
"""
from mmray.errors import ConfigError, RunError, UserError, find_error, wrapped_errors

__all__ = ["ConfigError", "RunError", "UserError", "find_error", "wrapped_errors"]
