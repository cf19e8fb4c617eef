"""The torch-free serving runtime: a serving artifact's ``model.onnx`` run by ONNX Runtime.

``export_onnx`` (needs torch; called by deblur.artifact.export.export_serving_artifact) writes the
inference form of a model (NAFNet with TLC local pooling, U-Net, conv baseline) with dynamic
batch, height and width through the dynamo exporter (``torch.onnx.export(dynamo=True)``;
the legacy TorchScript exporter fails on NAFNet's LayerNorm2d), then checks ONNX Runtime
against torch on three tile sizes. The diffusion models are torch-only: they get no
``model.onnx``.

``OnnxServingModel`` offers what deblur.artifact.torch_model.ServingModel offers (deblur.service.runtime
uses either) and tiles exactly as deblur.inference.tiling.tiled_inference: the same grid, tile
cutter, blend and batch loop (deblur.core.tile_grid, on numpy arrays here). Importing this module
and running a model need numpy and onnxruntime only, never torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deblur.artifact.meta import ServedModelInfo, ServingError, read_artifact_meta
from deblur.core.config import TilingConfig
from deblur.core.files import sha256_file
from deblur.core.tile_grid import BatchCallback, BlendWeights, TileGrid, check_tiling_args, round_up, run_tiles

ONNX_FILE = "model.onnx"
ONNX_ARCHITECTURES = ("nafnet", "unet", "stacked_conv")   # the diffusion models stay torch-only
INPUT_NAME, OUTPUT_NAME = "image", "restored"
MIN_CHECK_PSNR_DB = 60.0   # export refuses a model.onnx further than this from torch
log = logging.getLogger(__name__)


def exportable(architecture: str) -> bool:
    """True for the architectures that have an ONNX form."""
    return architecture in ONNX_ARCHITECTURES


def export_onnx(model, path: str | Path, check_tile: int = 288) -> dict:
    """Write ``model`` (a torch module in its inference form, fp32, CPU) to ``path`` as ONNX.

    Returns what model.json records under ``onnx``: file, sha256, opset, the model's
    ``size_multiple`` and class, export seconds and the PSNR of ONNX Runtime against torch on
    a ``check_tile``-sized tile, one twice as wide and a small one. Raises ServingError below
    MIN_CHECK_PSNR_DB.
    """
    import torch   # export only: serving this module runs without torch

    path = Path(path)
    multiple = int(getattr(model, "size_multiple", 1))
    started = time.perf_counter()
    # batch 2 and sides past 1: torch.export fixes any dimension whose example size is 1
    example = torch.rand(2, 3, 4 * multiple, 4 * multiple, generator=torch.Generator().manual_seed(0))
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes={"x": {0: dynamic, 2: dynamic, 3: dynamic}}, verbose=False)
    program.save(str(path))
    seconds = time.perf_counter() - started
    side = max(multiple, round_up(check_tile, multiple))
    checks = {}
    session = _session(path, threads=1)
    # a default tile, a wider one (past a TLC window the size of a tile) and a small one
    for shape in ((1, 3, side, side), (1, 3, side, 2 * side), (1, 3, round_up(24, multiple), round_up(40, multiple))):
        # noise over gradients: local statistics vary across the tile, so local pooling matters
        ramp_y = torch.linspace(0, 0.8, shape[2]).view(1, 1, -1, 1)
        ramp_x = torch.linspace(0.8, 0, shape[3]).view(1, 1, 1, -1)
        x = 0.2 * torch.rand(*shape, generator=torch.Generator().manual_seed(1)) + ramp_y * ramp_x
        with torch.inference_mode():
            expected = model(x).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        checks["x".join(map(str, shape[2:]))] = round(float(_psnr(got, expected)), 2)
    worst = min(checks.values())
    if worst < MIN_CHECK_PSNR_DB:
        path.unlink(missing_ok=True)
        raise ServingError(f"{path.name}: ONNX Runtime is {worst:.1f} dB from torch on a test tile (PSNR by tile "
                           f"size: {checks}); below {MIN_CHECK_PSNR_DB} dB the ONNX model is not written")
    return {"file": path.name, "sha256": sha256_file(path), "size_multiple": multiple,
            "model_class": type(model).__name__, "opset": _opset(path), "export_seconds": round(seconds, 2),
            "check_psnr_db": checks}


@dataclass
class OnnxServingModel(ServedModelInfo):
    """A serving artifact's ``model.onnx`` in an ONNX Runtime session, with the metadata the service reports."""

    session: object            # onnxruntime.InferenceSession
    meta: dict
    tiling: TilingConfig
    size_multiple: int
    load_seconds: float = 0.0
    source: str = ""
    runtime: str = field(default="onnx", init=False)

    @property
    def architecture(self) -> str:
        return str(self.meta["onnx"].get("model_class") or self.meta.get("architecture"))

    @property
    def samples(self) -> bool:
        return False

    def sampling_for(self, seed: int | None = None, steps: int | None = None) -> dict[str, int]:
        raise ValueError(f"seed and steps apply to diffusion refiners only; this model is a {self.architecture}")

    def run(self, tiles: np.ndarray) -> np.ndarray:
        """The model on a float32 (N, 3, h, w) batch."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: tiles})[0]

    def deblur(self, image, tile_size: int | None = None, overlap: int | None = None,
               sampling: dict[str, int] | None = None, on_batch: BatchCallback | None = None) -> np.ndarray:
        """Deblur an HxWx3 uint8 RGB array (or a DecodedImage's RGB); ``on_batch``: see deblur.inference.tiling."""
        if sampling:
            raise ValueError(f"sampling settings {sorted(sampling)} apply to diffusion models only, "
                             f"not to a {self.architecture}")
        rgb = getattr(image, "rgb", image)
        tiling = self.tiling_for(tile_size, overlap)
        return tiled_deblur(self.run, rgb, tiling.tile_size, tiling.overlap, tiling.batch_size,
                            self.size_multiple, on_batch)


def load_onnx_serving_model(model_dir: str | Path, threads: int | None = None) -> OnnxServingModel:
    """Load a serving artifact's ``model.onnx`` into ONNX Runtime (``threads`` intra-op threads).

    Raises ServingError when the artifact has no ONNX form or onnxruntime is not installed."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    served = served_onnx_model(model_dir, read_artifact_meta(model_dir), threads)
    served.load_seconds = time.perf_counter() - started
    return served


def served_onnx_model(model_dir: str | Path, meta: dict, threads: int | None = None) -> OnnxServingModel:
    """The ONNX model of the serving artifact in ``model_dir`` whose model.json is ``meta``."""
    model_dir = Path(model_dir)
    info = meta.get("onnx")
    if not info or not (model_dir / ONNX_FILE).is_file():
        why = ("the diffusion models have no ONNX form" if not exportable(str(meta.get("architecture")))
               else "it is exported when serving.runtime is onnx, or by scripts/build_function_package.py --runtime onnx")
        raise ServingError(f"{model_dir}: no {ONNX_FILE} in this serving artifact ({why})")
    session = _session(model_dir / ONNX_FILE, threads or int(meta["serving"]["threads"]))
    return OnnxServingModel(session=session, meta=meta, tiling=TilingConfig.model_validate(meta["tiling"]),
                            size_multiple=int(info["size_multiple"]), source=str(model_dir))


def tiled_deblur(run: Callable[[np.ndarray], np.ndarray], rgb: np.ndarray, tile_size: int, overlap: int,
                 batch_size: int, align: int, on_batch: BatchCallback | None = None) -> np.ndarray:
    """deblur.inference.tiling.deblur_array in numpy: ``run`` maps a float32 (N, 3, h, w) batch in [0, 1] to the
    model's output; ``rgb`` is HxWx3 uint8; returns HxWx3 uint8."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    check_tiling_args((1, 3, height, width), tile_size, overlap, batch_size)
    grid = TileGrid.plan(height, width, tile_size, overlap, align)
    blend = BlendWeights(grid)

    def predict(crops: list[np.ndarray]) -> np.ndarray:
        inputs = np.stack(crops).astype(np.float32)
        inputs /= np.float32(255.0)
        return run(inputs).astype(np.float32, copy=False)

    output = np.zeros((1, 3, height, width), dtype=np.float32)
    run_tiles(grid, rgb.transpose(2, 0, 1)[None], output, blend, batch_size, predict, on_batch)
    blend.normalise(output)
    np.clip(output, 0.0, 1.0, out=output)
    output *= np.float32(255.0)
    np.rint(output, out=output)   # in place: a 4096x4096 image's float buffer is 200 MB
    return np.ascontiguousarray(output[0].astype(np.uint8).transpose(1, 2, 0))


def _session(path: Path, threads: int):
    try:
        import onnxruntime as ort   # imported when a session is opened, not when this module is
    except ImportError as err:
        raise ServingError(f"serving.runtime onnx needs the onnxruntime package ({err}); install it "
                           "(function_app/requirements-onnx.txt) or use serving.runtime torch") from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle pool threads sleep instead of spinning for the next op: on shared cores (Azure Functions, a busy
    # machine) a spinning thread takes the time slice the working one needs (documentation/serving.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:   # onnxruntime raises its own exception types for unreadable or invalid graphs
        raise ServingError(f"{path}: ONNX Runtime cannot load it ({type(err).__name__}: {err})") from err


def _opset(path: Path) -> int | None:
    try:
        import onnx   # only to read the opset of an exported file
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 200.0 if mse < 1e-20 else min(200.0, 10 * np.log10(1.0 / mse))   # finite: model.json is strict JSON
