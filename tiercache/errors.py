"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class TiercacheError(Exception):
    """A mistake in the user's input or environment, not a bug: printed without a traceback."""


class StoreError(TiercacheError):
    """A store that is missing, foreign, from another format version, or corrupt."""


class UnsupportedModel(TiercacheError):
    """An architecture or tensor layout tiercache does not run."""


class BudgetError(TiercacheError):
    """A memory budget that cannot hold what the run needs; the message carries the numbers."""
