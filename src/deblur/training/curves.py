"""The training curves from a run's history: the two CSVs ``dvc plots`` reads and the figure logged to MLflow.

A history entry is a logged step (``loss``, ``lr``, ``grad_norm``, ``cpu_hours``) or a
validation (``val_psnr``, ``val_ssim``, ``val_input_psnr``, ``cpu_hours``); both can share a
step. Logged steps go to the training curve (``reports/train_curve.csv``), validations to the
validation curve (``reports/val_curve.csv``). ``cpu_hours`` stays out of both: they are DVC
outputs, and CPU time differs on every run, so a fresh run of the same inputs would write other
bytes than the committed ``dvc.lock`` records (it is in the MLflow metrics and in ``last.pt``).
"""

from __future__ import annotations

import csv
from pathlib import Path


TRAIN_FIELDS = ("step", "loss", "lr", "grad_norm")
VAL_FIELDS = ("step", "val_psnr", "val_input_psnr", "val_ssim")


def write_curve(history: list[dict], path: Path) -> None:
    """Training curve as CSV for ``dvc plots``: one row per logged step (loss, lr, grad norm)."""
    _write_rows([h for h in history if "loss" in h], TRAIN_FIELDS, path)


def write_val_curve(history: list[dict], path: Path) -> None:
    """Validation curve as CSV for ``dvc plots``: one row per validation, every cell filled.

    Apart from the training curve because validation runs every ``val_every`` steps: in one
    table the other steps would hold empty cells, which DVC's plots draw as 0 dB."""
    _write_rows([h for h in history if "val_psnr" in h], VAL_FIELDS, path)


def _write_rows(entries: list[dict], fields: tuple[str, ...], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    for entry in entries:   # one row per step, the last entry of a step wins
        rows.setdefault(entry["step"], {"step": entry["step"]}).update(entry)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow(rows[step])


def curve_figure(history: list[dict]):
    """Loss and validation PSNR side by side (a matplotlib figure)."""
    import matplotlib  # only here, for the figure: the backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_psnr"], h["val_input_psnr"]) for h in history if "val_psnr" in h]
    if loss:
        ax_loss.plot(*zip(*loss))
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    if val:
        steps, out, inp = zip(*val)
        ax_psnr.plot(steps, out, marker="o", label="model")
        ax_psnr.plot(steps, inp, linestyle="--", label="blurred input")
        ax_psnr.legend()
    ax_psnr.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR")
    fig.tight_layout()
    return fig
