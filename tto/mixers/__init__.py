"""One file per paper. Importing this package imports every module in it, which registers its mixer:
a new paper is a new file here, with no list to keep in sync."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
