"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class TiercacheError(Exception):
    """A mistake in the user's input or environment, not a bug: printed without a traceback."""


class StoreError(TiercacheError):
    """A store that is missing, foreign, from another format version, or corrupt."""


class UnsupportedModel(TiercacheError):
    """An architecture or tensor layout tiercache does not run."""


class TiercacheWarning(UserWarning):
    """Something the user should know that does not stop the run: the CLI prints one line."""


def warn(message: str) -> None:
    import warnings
    warnings.warn(message, TiercacheWarning, stacklevel=3)


class ContextError(TiercacheError):
    """More positions than the context (--context, or the model's own limit) holds."""


class BudgetError(TiercacheError):
    """A memory budget that cannot hold what the run needs; the message carries the numbers."""


def load_json_object(path, what: str, error=TiercacheError) -> dict:
    """A JSON object from `path`, or one line naming the file and `what` it should be."""
    import json
    from pathlib import Path
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a {what} ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: not a {what}")
    return d
