"""Pick a provider by name from a lazy ``name -> "module:Class"`` map.

Vendor SDKs are optional extras, so a provider's module is imported only when configured.
Each provider class offers ``from_config(config)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from services.runtime.errors import ConfigError


def load_provider(stage: str, registry: Mapping[str, str], name: str, config: Any) -> Any:
    target = registry.get(name)
    if target is None:
        known = ", ".join(sorted(registry))
        raise ConfigError(f"unknown {stage} provider {name!r}; known: {known}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{stage} provider {name!r} needs a package that is not installed ({exc.name}); "
            f"install the extra: pip install 'voicebus[{stage}-{name}]'"
        ) from None
    return getattr(module, class_name).from_config(config)
