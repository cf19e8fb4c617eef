"""``models:/`` URIs in model settings (a diffusion model's predictor) resolved through the registry.

Importing this module registers the resolver with ``deblur.core.model_sources``; the stages, the
pyfunc and the loaders that may build such a model import it. The registry code (and peft with
it) loads only when a URI is actually resolved.
"""

from __future__ import annotations

from pathlib import Path

from deblur.core import model_sources


def checkpoint_from_registry(uri: str, dest: Path) -> Path:
    from deblur.tracking.registry_io import download_model_checkpoint  # peft loads with it: only when a URI is used

    return download_model_checkpoint(uri, dest)


model_sources.register_models_uri_resolver(checkpoint_from_registry)
