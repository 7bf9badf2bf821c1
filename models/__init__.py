"""Model runners: each model behind a small load / predict interface, loaded once per process.

The rest of the application never touches torch directly.
"""

from models.errors import ModelLoadError

__all__ = ["ModelLoadError"]
