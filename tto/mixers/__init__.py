"""One file per paper. Importing this package registers every mixer."""

from . import titans, transformer, ttt  # noqa: F401  (registration side effects)
