"""Architectures: any image size in and out, real optimisation steps, TLC, registry."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deblur.core.config import ModelConfig, load_params
from deblur.training.losses import CompositeLoss
from deblur.models.common import MODELS
from deblur.models.build import build_model, configure_inference, count_parameters
from deblur.models.common import load_grown, pad_to_multiple
from deblur.models.nafnet import LocalAvgPool2d, NAFNet

ROOT = Path(__file__).resolve().parents[2]
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

    def psnr_db() -> float:
        with torch.no_grad():
            return float(-10 * torch.log10((model(blurred) - sharp).square().mean()))

    start_psnr, losses = psnr_db(), []
    for _ in range(8):
        optimiser.zero_grad()
        total, components = loss_fn(model(blurred), sharp)
        total.backward()
        assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
        optimiser.step()
        losses.append(total.item())
    assert set(components) == set(params.loss.weights())
    assert losses[-1] < losses[0], losses  # whatever params.yaml's loss is (PSNR loss has an 80 dB offset)
    assert psnr_db() > start_psnr + 0.1, (start_psnr, psnr_db())


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
    row = torch.arange(5.0).view(1, 1, 1, 5)
    assert pad_to_multiple(row.expand(1, 1, 8, 5), 8)[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1]
    assert pad_to_multiple(row, 8)[0, 0, :, -1].tolist() == [4.0] * 8  # pad 7 >= side 1: replicate
    x = torch.rand(1, 3, 16, 32)
    assert pad_to_multiple(x, 16) is x


def test_local_pool_matches_a_sliding_window_mean():
    x = torch.rand(2, 4, 13, 21)
    pool = LocalAvgPool2d(5)
    valid = F.avg_pool2d(x, 5, stride=1)  # (9, 17): two border rows/columns each side
    expected = F.pad(valid, (2, 2, 2, 2), mode="replicate")
    torch.testing.assert_close(pool(x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(LocalAvgPool2d(21)(x), x.mean(dim=(-2, -1), keepdim=True))
    wide = LocalAvgPool2d(15)(x)  # covers the height only: a 13x15 window
    torch.testing.assert_close(wide[..., 3, 7], x[..., :, :15].mean(dim=(-2, -1)), atol=1e-6, rtol=1e-5)


def test_tlc_is_global_on_train_patches_and_local_on_larger_images(params):
    cfg = tiny_config(params, "nafnet")
    model = tiny_model(params, "nafnet").eval()
    randomise_residual_scales(model)
    torch.nn.init.normal_(model.ending.weight, std=0.1)  # undo the near-identity start so pooling shows
    patch, big = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 96, 80)
    with torch.no_grad():
        global_patch, global_big = model(patch), model(big)
        assert configure_inference(model, cfg, train_patch_size=32) is model
        local_patch, local_big = model(patch), model(big)
    base = round(cfg.nafnet.tlc_factor * 32)
    assert model.encoders[0][0].sca.pool.window == base
    assert model.middle[0].sca.pool.window == base // 4
    assert model.decoders[-1][0].sca.pool.window == base
    torch.testing.assert_close(local_patch, global_patch)
    assert (local_big - global_big).abs().max() > 1e-3
    model.use_global_pooling()
    with torch.no_grad():  # channels-last weights now: same values, other summation order
        torch.testing.assert_close(model(big), global_big, atol=1e-5, rtol=1e-5)


def test_configure_inference_leaves_other_models_and_tlc_off_alone(params):
    unet = tiny_model(params, "unet").eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        expected = unet(x)
        configure_inference(unet, tiny_config(params, "unet"), train_patch_size=32)
        torch.testing.assert_close(unet(x), expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    raw = tiny_config(params, "nafnet").model_dump()
    raw["nafnet"]["tlc"] = False
    off = ModelConfig.model_validate(raw)
    nafnet = build_model(off)
    configure_inference(nafnet, off, train_patch_size=32)
    assert not any(isinstance(m, LocalAvgPool2d) for m in nafnet.modules())
    with pytest.raises(TypeError, match="nafnet"):
        configure_inference(unet, off, train_patch_size=32)


def test_registry_names_and_duplicates():
    assert set(NAMES) <= set(MODELS.names())
    with pytest.raises(KeyError, match="already registered"):
        MODELS.register("nafnet")(NAFNet)
    with pytest.raises(KeyError, match="unknown model"):
        MODELS.get("no_such_model")


def _nafnet_config(params, **arch) -> ModelConfig:
    raw = params.model.model_dump()
    raw["name"] = "nafnet"
    raw["nafnet"].update(TINY["nafnet"], **arch)
    return ModelConfig.model_validate(raw)


def test_a_trained_nafnet_grows_deeper_with_the_same_output(params):
    """Deeper middle/stages from a smaller model's weights: new blocks start as exact identities."""
    torch.manual_seed(0)
    small = build_model(_nafnet_config(params)).eval()
    with torch.no_grad():  # "trained": every scale non-zero, so the old blocks really act
        for name, p in small.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, 0.5)
    deep = build_model(_nafnet_config(params, middle_blocks=3, enc_blocks=[1, 2])).eval()
    grown = load_grown(deep, small.state_dict())
    assert sorted(grown) == ["encoders.1.1", "middle.1", "middle.2"]
    x = torch.rand(1, 3, 21, 30)
    with torch.no_grad():
        assert torch.equal(deep(x), small(x))
        assert not torch.allclose(small(x), x, atol=1e-3)


def test_growing_refuses_weights_that_do_not_fit(params):
    small = build_model(_nafnet_config(params))
    state = small.state_dict()
    narrower = build_model(_nafnet_config(params, width=4))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_grown(narrower, state)
    partial = {k: v for k, v in state.items() if k != "middle.0.conv1.weight"}
    with pytest.raises(RuntimeError, match="middle.0 is only partly"):
        load_grown(build_model(_nafnet_config(params)), partial)
    shallower = build_model(_nafnet_config(params, middle_blocks=0))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_grown(shallower, state)
