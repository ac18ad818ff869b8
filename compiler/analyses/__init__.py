"""Built-in analyses; importing this package registers them with modelsurgeon.analysis."""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
