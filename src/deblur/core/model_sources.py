"""Settings that name a checkpoint by a ``models:/`` URI (a diffusion model's predictor).

Resolving one needs the MLflow registry, a layer above the models that read such settings:
``deblur.tracking.models_uri`` registers the resolver when it is imported (the stages, the
pyfunc and the service's torch loader import it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from deblur.core.errors import DeblurError

_resolver: Callable[[str, Path], Path] | None = None


def register_models_uri_resolver(resolve: Callable[[str, Path], Path]) -> None:
    """``resolve(uri, dest)`` downloads the checkpoint a ``models:/`` URI names into ``dest``; returns its path."""
    global _resolver
    _resolver = resolve


def checkpoint_from_models_uri(uri: str, dest: Path) -> Path:
    """The local checkpoint file for ``uri``, downloaded into ``dest``."""
    if _resolver is None:
        raise DeblurError(f"{uri}: models:/ URIs need the registry; import deblur.tracking.models_uri first "
                          "or give a checkpoint file")
    return _resolver(uri, dest)
