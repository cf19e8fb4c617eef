"""Loss components: zero on identical images, positive otherwise, fp32, finite gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deblur.core.config import LossConfig, load_params
from deblur.training.losses import LOSSES, MSSSIM, CompositeLoss, ssim_window

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("charbonnier", "ms_ssim", "l1", "mse", "psnr", "fft", "edge")


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def loss_config(params, **weights: float) -> LossConfig:
    raw = params.loss.model_dump()
    raw.update({name: 0.0 for name in COMPONENTS})
    raw.update(weights)
    return LossConfig.model_validate(raw)


@pytest.fixture(scope="module")
def every_component(params):
    return CompositeLoss(loss_config(params, **{name: 1.0 for name in COMPONENTS}))


def noisy_pair(shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=gen)
    return (target + 0.05 * torch.randn(shape, generator=gen)).clamp(0, 1), target


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 164, 170), (1, 3, 5, 9)])
def test_zero_for_identical_positive_for_different(every_component, shape):
    pred, target = noisy_pair(shape)
    total, same = every_component(target, target.clone())
    assert set(same) == set(COMPONENTS)
    assert all(abs(v.item()) < 1e-6 for v in same.values()), same
    assert abs(total.item()) < 1e-5
    _, different = every_component(pred, target)
    assert all(v.item() > 0 for v in different.values()), different


def test_only_weighted_components_are_computed_and_summed(params):
    loss = CompositeLoss(params.loss)
    pred, target = noisy_pair((2, 3, 48, 48))
    total, components = loss(pred, target)
    weights = params.loss.weights()
    assert set(components) == set(weights) == set(loss.terms)
    expected = sum(weights[name] * value for name, value in components.items())
    torch.testing.assert_close(total, expected)
    assert not any(v.requires_grad for v in components.values())


def test_psnr_loss_is_80_db_minus_psnr(params):
    loss = CompositeLoss(loss_config(params, psnr=1.0))
    pred, target = noisy_pair((1, 3, 40, 40))
    mse = (pred - target).square().mean()
    _, components = loss(pred, target)
    assert components["psnr"].item() == pytest.approx(80.0 + 10 * math.log10(mse.item()), abs=1e-3)


def test_ms_ssim_falls_back_to_ssim_below_the_minimum_side(params):
    term = MSSSIM(params.loss)
    pred, target = noisy_pair((1, 3, 64, 200))
    term(pred, target)
    assert term.variant == "ssim(win=11)"
    pred, target = noisy_pair((1, 3, params.loss.ms_ssim_min_side, 200))
    term(pred, target)
    assert term.variant == "ms_ssim"
    assert (ssim_window(7, 30), ssim_window(8, 30), ssim_window(2, 2), ssim_window(64, 64)) == (7, 7, 1, 11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_fp32(every_component, dtype):
    pred, target = noisy_pair((2, 3, 24, 24))
    pred = pred.to(dtype).requires_grad_()
    total, components = every_component(pred, target.to(dtype))
    assert total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in components.values())
    total.backward()
    assert pred.grad.dtype == dtype
    assert pred.grad.float().isfinite().all() and pred.grad.abs().sum() > 0


def test_gradients_are_finite_near_a_perfect_prediction(every_component):
    target = torch.rand(1, 3, 32, 32)
    pred = (target + 1e-4 * torch.randn_like(target)).requires_grad_()
    every_component(pred, target)[0].backward()
    assert pred.grad.isfinite().all()


def test_shape_mismatch_and_registry_errors(every_component, params):
    with pytest.raises(ValueError, match="differ in shape"):
        every_component(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    assert set(LOSSES.names()) == set(COMPONENTS)
    with pytest.raises(KeyError, match="already registered"):
        LOSSES.register("l1")(MSSSIM)
    with pytest.raises(ValueError, match="at least one"):
        loss_config(params)
