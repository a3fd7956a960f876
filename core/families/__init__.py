"""Model families: one module per family, each defining `FAMILY` (a promptmux.core.families.base.Family).

Every module in this package that defines `FAMILY` is registered when the package is imported. Nothing outside
this package branches on a family's name; it asks the family (`spec.family`, core/archs.py) instead.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Family

FAMILIES: dict[str, Family] = {}

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    _family = getattr(importlib.import_module(f"{__name__}.{_module}"), "FAMILY", None)
    if _family is not None:
        FAMILIES[_family.name] = _family


def family_of(name: str) -> Family:
    """The family a name (the manifest's base.family) names; a model's is its ArchSpec's `family`."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; promptmux knows {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "family_of"]
