"""The data package's one error type."""
from configs import ConfigError


class DataError(ConfigError):
    """Bad data input (missing path, empty corpus, bad tokenizer or JSONL): a one-line message naming it.

    A subclass of ConfigError, so entry scripts report it the same way (exit code 2, no traceback).
    """
