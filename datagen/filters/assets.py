"""Rule packs and verifier assets: data files under the repository's ``filters/`` folder.

``DATAGEN_FILTERS_DIR`` points elsewhere (an installed wheel does not carry the folder).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from datagen.filters.base import FilterError


def assets_dir() -> Path:
    return Path(os.environ.get("DATAGEN_FILTERS_DIR") or Path(__file__).resolve().parents[2] / "filters")


@lru_cache(maxsize=64)
def asset_yaml(folder: str, name: str) -> dict[str, Any]:
    """``filters/<folder>/<name>.yaml``, a mapping; cached per process."""
    import yaml

    path = assets_dir() / folder / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FilterError(f"{folder[:-1]} {name!r} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise FilterError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FilterError(f"{path} must be a mapping")
    return data


def rule_pack(name: str) -> dict[str, Any]:
    """``filters/rules/<name>.yaml``."""
    return asset_yaml("rules", name)
