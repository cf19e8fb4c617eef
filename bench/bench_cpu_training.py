"""Issue #11's CPU training comparison: gain per CPU-hour of each camera-shake run, and what
each architecture costs to train and to serve, measured in the same run.

Training progress comes from the background runs of ``scripts/cpu_pretrain_shake.sh``:
validation PSNR from each run's ``last.pt`` history and ``train.log``, plus its ``last.pt``
scored now (``--start``, the checkpoint both runs began from, is scored the same way), and the
process CPU seconds sampled beside the step count in ``--cpu-log`` (``scripts/sample_cpu_hours.py``).
Steps no sample covers are costed at the step time measured here, so each curve starts at
0 CPU-hours from the start checkpoint.

Costs (stop the background runs first: they would distort both):
- training: seconds per AdamW step (batch, patch and loss of the profile) on 1 thread, as the
  background runs train;
- serving: seconds per tiled 1280x720 frame on ``--threads`` threads, the serving tiling from
  params.yaml, against the profile-free baseline (params.yaml's model) in the same run.

    python bench/bench_cpu_training.py --run shake=configs/pretrain-cpu-shake.yaml:data/pretrain_shake \
        --run shake_deep=configs/pretrain-cpu-shake-deep.yaml:data/pretrain_shake_deep [--cpu-log data/cpu_hours.csv]

Writes bench/results/cpu_training.{json,md} and documentation/img/cpu_training.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deblur.core.config import load_params
from deblur.training.losses import CompositeLoss
from deblur.models.build import build_model, configure_inference, count_parameters
from deblur.inference.tiling import deblur_array

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "documentation" / "img"
VAL_LINE = re.compile(r"\[train\] step (\d+): val PSNR ([\d.]+) dB \(blurred input ([\d.]+) dB\)")
INIT_LINE = re.compile(r"initialised weights from (\S+)")


def train_step_seconds(params_path: Path, steps: int) -> float:
    """Median seconds of one training step of the profile's model on 1 thread."""
    params = load_params(params_path)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(params.model)
    loss_fn = CompositeLoss(params.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=params.train.lr)
    size, batch = params.train.patch_size, params.train.batch_size
    x, y = torch.rand(batch, 3, size, size), torch.rand(batch, 3, size, size)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def frame_seconds(profiles: dict[str, Path], threads: int, repeats: int) -> dict[str, float]:
    """Median seconds of one tiled 1280x720 frame per profile's model, with the serving tiling of
    params.yaml; the models take turns in each round, so a slow moment of the machine hits all."""
    serving = load_params(ROOT / "params.yaml")
    torch.set_num_threads(threads)
    models = {}
    for name, path in profiles.items():
        params = load_params(path)
        torch.manual_seed(0)
        models[name] = configure_inference(build_model(params.model).eval(), params.model, params.train.patch_size)
    frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            deblur_array(model, frame, serving.tiling)
            if round_ > 0:   # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def val_psnr(checkpoint: Path, pairs_dir: Path, max_images: int, threads: int) -> tuple[int, float, float]:
    """(step, val PSNR, blurred-input PSNR) of a checkpoint on a run's val split, computed as the
    trainer validates (its first ``train.val_max_images`` pairs, whole images, inference form, uint8 output)."""
    from deblur.models.checkpoint_file import load_checkpoint
    from deblur.models.build import model_from_checkpoint
    from deblur.data.datasets import to_tensor, to_uint8
    from deblur.data.pairs import read_pairs
    from deblur.core.imageio import read_rgb
    from deblur.evaluation.metrics import psnr

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    out, inp = [], []
    with torch.inference_mode():
        for rec in read_pairs(pairs_dir, "val")[:max_images]:
            blurred, sharp = read_rgb(rec.blur_path), read_rgb(rec.clear_path)
            restored = to_uint8(model(to_tensor(blurred).unsqueeze(0))[0].float())
            out.append(psnr(restored, sharp))
            inp.append(psnr(blurred, sharp))
    return int(ckpt.get("step", 0)), float(np.mean(out)), float(np.mean(inp))


def validations(work: Path) -> list[tuple[int, float, float]]:
    """(step, val PSNR, blurred-input PSNR) of every validation of the run, in step order: from the
    history in its last.pt (which spans earlier sessions) and its log (last wins per step)."""
    by_step: dict[int, tuple[float, float]] = {}
    last = work / "checkpoints" / "last.pt"
    if last.exists():
        for h in torch.load(last, map_location="cpu", weights_only=False).get("history", []):
            if "val_psnr" in h:
                by_step[int(h["step"])] = (round(float(h["val_psnr"]), 2), round(float(h["val_input_psnr"]), 2))
    log = work / "train.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    by_step.update({int(s): (float(p), float(i)) for s, p, i in VAL_LINE.findall(text)})
    return [(s, *by_step[s]) for s in sorted(by_step)]


def cpu_seconds_by_step(cpu_log: Path, run: str, step_seconds: float) -> list[tuple[int, float]]:
    """(step, cumulative CPU seconds) of ``run`` from the sampled process CPU time, summed over
    restarts. Steps not covered by samples (before the first one, or between a process's last
    sample and the next process's first) are costed at ``step_seconds`` each."""
    rows = []
    if cpu_log.exists():
        with open(cpu_log) as f:
            rows = [r for r in csv.DictReader(f) if r["run"] == run and r["step"]]
    points: list[tuple[int, float]] = []
    base, first_cpu, last_pid = 0.0, 0.0, None
    for r in rows:
        step, cpu, pid = int(r["step"]), float(r["cpu_s"]), r["pid"]
        if pid != last_pid:   # a new process: its CPU clock starts again
            prev_step, prev_cpu = points[-1] if points else (0, 0.0)
            base, first_cpu, last_pid = prev_cpu + max(0, step - prev_step) * step_seconds, cpu, pid
        points.append((step, base + cpu - first_cpu))
    return points


def at_step(points: list[tuple[int, float]], step: int, step_seconds: float) -> float:
    """CPU seconds at ``step``, interpolated between samples (extrapolated at ``step_seconds``)."""
    if not points:
        return step * step_seconds
    steps = [p[0] for p in points]
    if step <= steps[0]:
        return max(0.0, points[0][1] - (steps[0] - step) * step_seconds)
    if step >= steps[-1]:
        return points[-1][1] + (step - steps[-1]) * step_seconds
    return float(np.interp(step, steps, [p[1] for p in points]))


def figure(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        if rows:
            ax.plot([r["cpu_hours"] for r in rows], [r["gain_db"] for r in rows], marker="o", label=name)
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1, label="shipped NAFNet-16 (start)")
    ax.set(xlabel="CPU-hours of training (1 thread)", ylabel="val PSNR gain over the start (dB)",
           title="Camera-shake training on CPU: gain per CPU-hour")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=PROFILE:WORK")
    ap.add_argument("--cpu-log", type=Path, default=ROOT / "data" / "cpu_hours.csv")
    ap.add_argument("--start", type=Path, default=ROOT / "checkpoints" / "pretrained" / "nafnet16.pt",
                    help="the checkpoint every run started from; scored on the first run's val split")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    runs = {}
    for spec in args.run:
        name, rest = spec.split("=", 1)
        profile, work = rest.split(":", 1)
        runs[name] = (Path(profile), Path(work))

    frames = frame_seconds({"serving default": ROOT / "params.yaml", **{n: p for n, (p, _) in runs.items()}},
                           args.threads, args.repeats)
    baseline_frame = frames["serving default"]
    results, curves = {}, {}
    for name, (profile, work) in runs.items():
        step_s = train_step_seconds(profile, args.steps)
        frame_s = frames[name]
        params = load_params(profile)
        vals = validations(work)
        last = work / "checkpoints" / "last.pt"
        if last.exists():   # the point where the run stands now, between validations
            step, p, i = val_psnr(last, work / "pairs", params.train.val_max_images, args.threads)
            vals = sorted({s: (s, vp, vi) for s, vp, vi in [*vals, (step, p, i)]}.values())
        points = cpu_seconds_by_step(args.cpu_log, name, step_s)
        results[name] = {
            "profile": str(profile), "parameters": count_parameters(build_model(params.model)),
            "train_step_s_1thread": round(step_s, 3), "frame_720p_s": round(frame_s, 3),
            "frame_vs_serving_default": round(frame_s / baseline_frame, 2),
            "validations": [{"step": s, "val_psnr": p, "val_input_psnr": i,
                             "cpu_hours": round(at_step(points, s, step_s) / 3600, 3)} for s, p, i in vals],
        }
    first_profile, first_work = next(iter(runs.values()))
    _, start, start_input = val_psnr(args.start, first_work / "pairs", load_params(first_profile).train.val_max_images,
                                     args.threads)
    for name, res in results.items():
        rows = [{"cpu_hours": 0.0, "gain_db": 0.0}] + [
            {"cpu_hours": v["cpu_hours"], "gain_db": round(v["val_psnr"] - start, 3)} for v in res["validations"]]
        curves[name] = rows
        best = max(rows, key=lambda r: r["gain_db"])
        last = rows[-1]
        res.update(start_val_psnr=start, best_gain_db=best["gain_db"], best_at_cpu_hours=best["cpu_hours"],
                   last_gain_db=last["gain_db"], cpu_hours=last["cpu_hours"],
                   gain_db_per_cpu_hour=round(last["gain_db"] / last["cpu_hours"], 3) if last["cpu_hours"] else None)

    out = {"threads_serving": args.threads, "serving_default_frame_720p_s": round(baseline_frame, 3),
           "torch": torch.__version__, "runs": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_training.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# CPU training for camera shake: gain per CPU-hour (bench/bench_cpu_training.py)", "",
             f"Start: {args.start.name}, val PSNR {start:.2f} dB on the runs' own val set (80 % camera shake; "
             f"blurred input {start_input:.2f} dB). "
             f"Serving default: {baseline_frame:.2f} s per tiled 1280x720 frame on {args.threads} threads, same run.", "",
             "| run | parameters | s/step (1 thread) | 720p frame (s) | vs serving default | CPU-hours | last gain (dB) "
             "| best gain (dB) | dB per CPU-hour |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['parameters']:,} | {r['train_step_s_1thread']} | {r['frame_720p_s']} | "
                     f"{r['frame_vs_serving_default']}x | {r['cpu_hours']} | {r['last_gain_db']:+.3f} | "
                     f"{r['best_gain_db']:+.3f} | {r['gain_db_per_cpu_hour']} |")
    (RESULTS / "cpu_training.md").write_text("\n".join(lines) + "\n")
    figure(curves, IMG / "cpu_training.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
