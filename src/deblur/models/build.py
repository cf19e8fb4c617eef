"""The architectures, listed once, and how to build them: import models from here.

Importing this module registers every architecture in ``MODELS``; ``build_model`` and
``model_from_checkpoint`` (``deblur.models.factory``) look them up there.
"""

from __future__ import annotations

from deblur.models import nafnet, stacked_conv, unet  # noqa: F401  (the architectures, registered on import)
from deblur.models.common import MODELS
from deblur.models.diffusion import controlnet_sd, refiner  # noqa: F401
from deblur.models.factory import (build_model, configure_inference, count_parameters, fitting_checkpoints,
                                   model_from_checkpoint)

__all__ = ["MODELS", "build_model", "configure_inference", "count_parameters", "fitting_checkpoints",
           "model_from_checkpoint"]
