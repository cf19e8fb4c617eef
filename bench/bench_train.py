"""Training throughput (patches/s) and peak memory per model, on CPU and, where present, CUDA.

Each configuration runs in a fresh process (so peak RSS is its own): a few warm-up steps,
then timed AdamW steps of the real loss on random patches of ``train.patch_size`` at
``train.batch_size``. Baselines in the same run: eager fp32 contiguous on CPU; on CUDA,
eager vs channels_last + bf16 vs torch.compile.

    python bench/bench_train.py [--params params.yaml] [--steps 10] [--threads 2]

Writes bench/results/train_speed.json and bench/results/train_speed.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(params_path: str, model: str, device: str, variant: str, steps: int, threads: int) -> dict:
    import torch

    from deblur.core.config import load_params
    from deblur.training.losses import CompositeLoss
    from deblur.models.build import build_model, count_parameters

    torch.set_num_threads(threads)
    params = load_params(params_path, overrides={"model.name": model})
    torch.manual_seed(0)
    net = build_model(params.model).to(device)
    channels_last = variant in ("channels_last_bf16", "compile")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    step_net = torch.compile(net) if variant == "compile" else net
    loss_fn = CompositeLoss(params.loss)
    opt = torch.optim.AdamW(net.parameters(), lr=params.train.lr)
    size, batch = params.train.patch_size, params.train.batch_size
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.rand(batch, 3, size, size, device=device)
    if channels_last:
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    use_bf16 = device == "cuda" and variant != "eager_fp32"

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            out = step_net(x)
        loss, _ = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "model": model, "device": device, "variant": variant, "parameters": count_parameters(net),
        "patch_size": size, "batch_size": batch, "steps": steps, "threads": threads,
        "patches_per_s": round(steps * batch / elapsed, 2), "ms_per_step": round(1000 * elapsed / steps, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["stacked_conv", "nafnet", "unet"])
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "DEVICE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.params, *args.one, args.steps, args.threads)))
        return 0

    import torch

    configs = [(m, "cpu", "eager_fp32") for m in args.models]
    if torch.cuda.is_available():
        configs += [(m, "cuda", v) for m in args.models for v in ("eager_fp32", "channels_last_bf16", "compile")]
    rows = []
    for model, device, variant in configs:
        proc = subprocess.run([sys.executable, __file__, "--params", args.params, "--steps", str(args.steps),
                               "--threads", str(args.threads), "--one", model, device, variant],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{model}/{device}/{variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    RESULTS.mkdir(exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / "train_speed.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = ["| model | params | device | variant | patch x batch | patches/s | ms/step | peak RSS MB | peak GPU MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['device']} | {r['variant']} | "
                     f"{r['patch_size']}² x {r['batch_size']} | {r['patches_per_s']} | {r['ms_per_step']} | "
                     f"{r['peak_rss_mb']} | {r.get('peak_gpu_mb', '-')} |")
    (RESULTS / "train_speed.md").write_text(f"Measured {meta['when']}, torch {meta['torch']}, "
                                            f"{meta['cpu_count']} CPUs, {args.threads} threads.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
