"""PET types. Importing this package registers every built-in type."""

from . import adapter, bitfit, diff_pruning, ia3, lora, maskbert, none  # noqa: F401 - registration
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
