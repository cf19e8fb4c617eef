"""Kernel-aware restoration: PSF input/output, non-blind deconvolution, blind kernel estimation."""
