"""One list of accepted image formats (deblur.core.imageio.ACCEPTED_FORMATS): the HTTP API, the pyfunc,
`deblur predict` and ingest all take it. GIF is accepted everywhere (its first frame); a format
outside the list (PPM) is refused everywhere, and every refusal lists the same formats."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import httpx
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image
from serving_support import ROOT, encode, make_artifact, make_checkpoint, running_server, smooth_rgb

from deblur.cli.predict import collect_inputs
from deblur.cli.predict import run as predict_run
from deblur.core.imageio import ACCEPTED_FORMATS, ACCEPTED_FORMATS_TEXT, IMAGE_SUFFIXES, ImageError, decode_image
from deblur.tracking.pyfunc import DeblurPyfunc

PHOTO = Image.fromarray(smooth_rgb(48, 64))
GIF, PPM = encode(PHOTO, "GIF"), encode(PHOTO, "PPM")
TILING = {"tile_size": 32, "overlap": 8, "batch_size": 1}


def test_each_accepted_format_decodes_and_another_is_refused_naming_the_list():
    for fmt in ACCEPTED_FORMATS:
        assert decode_image(encode(PHOTO, fmt)).rgb.shape == (48, 64, 3), fmt
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(PPM)
    assert ACCEPTED_FORMATS_TEXT == "JPEG, PNG, WebP, TIFF, BMP or GIF"
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"} == set(IMAGE_SUFFIXES)


def _png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_http_pyfunc_and_cli_agree_on_gif(tmp_path: Path):
    model_dir = make_artifact(tmp_path / "artifact", tiling=TILING)

    # the HTTP API: GIF is deblurred, PPM is 415 naming the accepted formats
    with running_server(model_dir) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        gif, ppm = client.post("/api/deblur", content=GIF), client.post("/api/deblur", content=PPM)
    assert gif.status_code == 200 and _png_size(gif.content) == (64, 48), gif.text
    assert ppm.status_code == 415 and ppm.json()["error"] == "unsupported_media_type", ppm.text
    assert ACCEPTED_FORMATS_TEXT in ppm.json()["detail"]

    # the pyfunc, as `mlflow models serve` loads and calls it
    pyfunc = DeblurPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": str(make_checkpoint(tmp_path / "ckpt.pt"))},
                                        model_config={"tiling": TILING, "max_pixels": None}))
    rows = pyfunc.predict(None, pd.DataFrame({"image": [base64.b64encode(GIF).decode("ascii")]}))["image"]
    assert _png_size(base64.b64decode(rows[0])) == (64, 48)
    with pytest.raises(MlflowException) as refused:
        pyfunc.predict(None, pd.DataFrame({"image": [base64.b64encode(PPM).decode("ascii")]}))
    assert "not a recognised image format" in str(refused.value) and ACCEPTED_FORMATS_TEXT in str(refused.value)

    # `deblur predict`: a folder's GIF is an input (written as PNG), its PPM is not; a PPM named is refused
    photos = tmp_path / "in"
    photos.mkdir()
    (photos / "a.gif").write_bytes(GIF)
    (photos / "b.ppm").write_bytes(PPM)
    assert [job.source.name for job in collect_inputs([str(photos)])] == ["a.gif"]
    out = tmp_path / "out"
    code = predict_run([str(photos / "a.gif"), str(photos / "b.ppm")], out, str(model_dir), ROOT / "params.yaml",
                       "same", None, None, 95, 1)
    assert code == 1   # one input refused
    assert sorted(p.name for p in out.iterdir()) == ["a.png"] and _png_size((out / "a.png").read_bytes()) == (64, 48)
