"""Deblurring architectures, built by name from ``ModelConfig`` through ``MODELS``
(``deblur.models.build``: the list of architectures, build and rebuild functions).

Every model maps an (N, 3, H, W) image in [0, 1] of any H, W to a sharp estimate of the
same size (padded to its size multiple inside ``forward``, cropped back), as
input + predicted residual, with no final activation: callers clamp at inference.
"""
