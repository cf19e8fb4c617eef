"""LoRA adaptation vs full fine-tuning on a new domain, with the same steps (issue #12, part 2).

The domain: scikit-learn's two sample photos (``load_sample_images``: china.jpg, flower.jpg;
in neither the embedded set nor the shipped checkpoint's training photos) under a strong defocus
blur, disk radius 6-9 px, beyond the 1.5-6 px the shipped model was trained on: a lens it never
saw. Training patches come from the left 60 % of each photo, the test images are the right 40 %
(each blurred with 3 seeded radii). From the shipped checkpoint (``train.init_from``), each
method takes the same steps on the same patch stream:

- LoRA (``train.lora`` targets, rank ``--rank``), only the adapter trains;
- full fine-tuning, every weight trains;

each at its own learning rate (LoRA wants a larger one; give several to sweep). Reported:
adapter size on disk (peft's files), trainable-parameter share, test PSNR gained over the base
model, seconds per step; and documentation/img/lora_new_domain.png.

    nice python bench/bench_lora.py [--steps 15] [--rank 4] [--lora-lrs 1e-3 3e-3]   # results/lora.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deblur.models import lora
from deblur.models.checkpoint_file import load_checkpoint
from deblur.models.build import model_from_checkpoint
from deblur.core.config import load_params
from deblur.data.blur import BlurSpec, apply_blur, disk_kernel
from deblur.data.datasets import to_tensor
from deblur.training.losses import CompositeLoss
from deblur.evaluation.metrics import psnr
from deblur.models.build import configure_inference
from deblur.core.progress import progress
from deblur.inference.tiling import deblur_array

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RADII = (6.0, 9.0)
TEST_BLURS_PER_PHOTO = 3
TRAIN_SHARE = 0.6
FIGURE_IMAGE = 2          # china.jpg's right part at the strongest defocus
FIGURE = ROOT / "documentation" / "img" / "lora_new_domain.png"


def domain(params, seed: int) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray, float]]]:
    """Training regions (sharp) and test triples (blurred, sharp, radius) of the new domain."""
    from sklearn.datasets import load_sample_images

    photos = [np.ascontiguousarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for photo in photos:
        cut = int(photo.shape[1] * TRAIN_SHARE)
        train.append(photo[:, :cut])
        sharp = np.ascontiguousarray(photo[:, cut:])
        for radius in np.linspace(*RADII, TEST_BLURS_PER_PHOTO):
            blurred = apply_blur(sharp, BlurSpec("defocus", disk_kernel(float(radius)), {"noise_sigma": 0.005}),
                                 params.synthesize, rng)
            test.append((blurred, sharp, float(radius)))
    return train, test


def patch_batches(train: list[np.ndarray], params, steps: int, batch: int, patch: int, seed: int):
    """The same seeded stream of (blurred, sharp) patch batches for every method."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        pairs = []
        for _ in range(batch):
            photo = train[int(rng.integers(len(train)))]
            y, x = int(rng.integers(photo.shape[0] - patch)), int(rng.integers(photo.shape[1] - patch))
            sharp = np.ascontiguousarray(photo[y:y + patch, x:x + patch])
            radius = float(rng.uniform(*RADII))
            spec = BlurSpec("defocus", disk_kernel(radius), {"noise_sigma": float(rng.uniform(0, 0.01))})
            pairs.append((apply_blur(sharp, spec, params.synthesize, rng), sharp))
        yield (torch.stack([to_tensor(b) for b, _ in pairs]), torch.stack([to_tensor(s) for _, s in pairs]))


def score_psnr(model: torch.nn.Module, ckpt: dict, test, params, shown: dict, label: str) -> list[float]:
    """PSNR on every test image; the outputs on the figure's image go to ``shown[label]``."""
    model = copy.deepcopy(model).eval()
    if lora.has_adapter(model):
        lora.merge_adapter(model)
    configure_inference(model, params.model, int(ckpt["train_patch_size"]))
    scores = []
    for i, (blurred, sharp, _) in enumerate(test):
        restored = deblur_array(model, blurred, params.tiling)
        if i == FIGURE_IMAGE:
            shown[label] = restored
        scores.append(psnr(restored, sharp))
    return scores


def fine_tune(ckpt: dict, method: str, lr: float, train, test, params, args, shown: dict) -> dict:
    torch.manual_seed(args.seed)
    model = model_from_checkpoint(ckpt, for_inference=False)
    result = {"method": method, "lr": lr}
    if method == "lora":
        settings = lora.LoraSettings.of(params.train.lora.model_copy(update={"rank": args.rank}))
        lora.attach_adapter(model, settings)
    result.update(lora.parameter_share(model))
    loss_fn = CompositeLoss(params.loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  betas=params.train.betas, weight_decay=params.train.weight_decay)
    model.train()
    started = time.perf_counter()
    for blurred, sharp in progress(patch_batches(train, params, args.steps, args.batch, args.patch, args.seed),
                                   total=args.steps, desc=f"{method} lr={lr:g}", unit="step"):
        total, _ = loss_fn(model(blurred), sharp)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
        optimizer.step()
    result["seconds_per_step"] = (time.perf_counter() - started) / args.steps
    if method == "lora":
        with tempfile.TemporaryDirectory() as tmp:
            result["adapter_bytes"] = lora.adapter_size_bytes(lora.save_adapter(model, settings, tmp))
    result["test_psnr"] = score_psnr(model, ckpt, test, params, shown, f"{method} lr={lr:g}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints/pretrained/nafnet16.pt")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora-lrs", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--full-lrs", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "lora")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="the comparison picture (empty: none)")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    ckpt = load_checkpoint(args.checkpoint)
    train, test = domain(params, args.seed)
    shown: dict[str, np.ndarray] = {}
    base = score_psnr(model_from_checkpoint(ckpt, for_inference=False), ckpt, test, params, shown, "base")
    runs = [fine_tune(ckpt, "lora", lr, train, test, params, args, shown) for lr in args.lora_lrs]
    runs += [fine_tune(ckpt, "full", lr, train, test, params, args, shown) for lr in args.full_lrs]
    base_size = args.checkpoint.stat().st_size
    for run in runs:
        run["gain_over_base_db"] = float(np.mean(run["test_psnr"]) - np.mean(base))
    record = {
        "domain": f"sklearn sample photos, defocus radius {RADII[0]}-{RADII[1]} px "
                  f"(train: left {TRAIN_SHARE:.0%}, test: right part x {TEST_BLURS_PER_PHOTO} radii)",
        "checkpoint": str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint),
        "checkpoint_bytes": base_size, "steps": args.steps, "batch": args.batch, "patch": args.patch,
        "rank": args.rank, "target_modules": list(params.train.lora.target_modules), "alpha": params.train.lora.alpha,
        "input_psnr": [psnr(b, s) for b, s, _ in test], "radii": [r for _, _, r in test], "base_psnr": base,
        "runs": runs, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    if args.figure:
        save_figure(record, shown, test[FIGURE_IMAGE], args.figure)


def save_figure(record: dict, shown: dict, example, path: Path) -> None:
    """Blurred, base, best LoRA, best full fine-tune (by mean gain) and sharp on one test image,
    PSNR in the titles; below, a zoomed centre crop of each."""
    from deblur.core.imageio import write_png
    from deblur.core.viz import hstack, vstack

    blurred, sharp, radius = example
    best = {m: max((r for r in record["runs"] if r["method"] == m), key=lambda r: r["gain_over_base_db"])
            for m in ("lora", "full")}
    panels = [("blurred", blurred), ("base", shown["base"]),
              *(("LoRA" if m == "lora" else "full FT", shown[f"{m} lr={r['lr']:g}"]) for m, r in best.items())]
    titles = [f"{name} {psnr(img, sharp):.2f} dB" for name, img in panels] + [f"sharp, r={radius:.1f}"]
    images = [img for _, img in panels] + [sharp]
    h, w = sharp.shape[:2]
    z = min(128, h, w)
    y0, x0 = (h - z) // 2, (w - z) // 2
    crops = [img[y0:y0 + z, x0:x0 + z] for img in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, vstack([hstack(images, 360, titles), hstack(crops, 208, [f"{t.split(' dB')[0]} dB" for t in titles[:-1]]
                                                                  + ["sharp"])]))


def markdown(r: dict) -> str:
    mean = lambda v: float(np.mean(v))
    lines = [f"# LoRA vs full fine-tuning on a new domain ({r['steps']} steps, batch {r['batch']} x {r['patch']}²)", "",
             f"Domain: {r['domain']}. Base: `{r['checkpoint']}` ({r['checkpoint_bytes'] / 1e3:.0f} kB). "
             f"LoRA rank {r['rank']}, alpha {r['alpha']}, targets {', '.join(r['target_modules'])}. "
             f"Machine: {r['machine']} (shared: seconds are indicative).", "",
             "| model | lr | trainable params (share) | stored update | test PSNR (dB) | gain over base (dB) | s/step |",
             "|---|---|---|---|---|---|---|",
             f"| blurred input | - | - | - | {mean(r['input_psnr']):.2f} | {mean(r['input_psnr']) - mean(r['base_psnr']):+.2f} | - |",
             f"| base (shipped) | - | - | - | {mean(r['base_psnr']):.2f} | 0 | - |"]
    for run in r["runs"]:
        stored = (f"{run['adapter_bytes'] / 1e3:.1f} kB adapter" if "adapter_bytes" in run
                  else f"{r['checkpoint_bytes'] / 1e3:.0f} kB checkpoint")
        lines.append(f"| {'LoRA' if run['method'] == 'lora' else 'full fine-tune'} | {run['lr']:g} | "
                     f"{run['trainable_parameters']:,} ({run['trainable_share']:.1%}) | {stored} | "
                     f"{mean(run['test_psnr']):.2f} | {run['gain_over_base_db']:+.2f} | {run['seconds_per_step']:.2f} |")
    lines += ["", "Per test image (radius px: input / base / " + " / ".join(
        f"{'LoRA' if run['method'] == 'lora' else 'full'} {run['lr']:g}" for run in r["runs"]) + "):", ""]
    for i, radius in enumerate(r["radii"]):
        values = [r["input_psnr"][i], r["base_psnr"][i], *(run["test_psnr"][i] for run in r["runs"])]
        lines.append(f"- image {i} (r={radius:.1f}): " + " / ".join(f"{v:.2f}" for v in values))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
