"""Installed package versions, for manifests and the data card (one reader for both)."""

from __future__ import annotations

import platform
from importlib import metadata


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python's version, then each installed package's in the order asked (missing: left out)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
