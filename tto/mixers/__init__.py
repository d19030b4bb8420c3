"""One file per paper. Importing this package registers every mixer."""

from . import transformer  # noqa: F401  (registration side effects)
