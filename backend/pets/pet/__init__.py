"""PET types. Importing this package registers every type: each module of the package is
imported, and those defining a ``@register_pet`` class add it to the registry, so a new type
is one new module here (see docs/contributing.md)."""

import importlib
import pkgutil

from .base import (
    CostDims,
    LoadedTask,
    PetConfig,
    PetContext,
    PetCost,
    PetMethod,
    bare_type,
    get_pet_type,
    pet_types,
    register_pet,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "CostDims",
    "LoadedTask",
    "PetConfig",
    "PetContext",
    "PetCost",
    "PetMethod",
    "bare_type",
    "get_pet_type",
    "pet_types",
    "register_pet",
]
