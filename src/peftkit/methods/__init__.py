"""Methods: one file each. Importing this package imports every module in it, which registers every method.

A module registers its method with `core.registry.register_adapter`; helper modules (inits, combine) register
nothing. Adding a method is adding its file here: there is no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
