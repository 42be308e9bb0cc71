"""The one error type users see for their own mistakes (bad adapters, bad configs, bad targets)."""


class GraftingError(ValueError):
    """A user-facing error: says which file or field is wrong and what was expected."""
