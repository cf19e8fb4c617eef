"""The API contract against a real ``python -m deblur.service`` process: the OpenAPI spec describes
every route and every error code the service can raise, ``/api/docs`` loads with no CDN (also under
Azure's ``/api`` prefix and a function key), and a bounded schemathesis run finds no server error
and no undocumented status, media type, header or body."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from PIL import Image

from deblur.service.decoding import ACCEPTED_FORMATS, MAX_SEED, MEDIA_TYPES, OUTPUT_FORMATS
from deblur.service.errors import DEBLUR_ROUTE, ERROR_CODES, EVERY_ROUTE, FRAMEWORK_CODES, NO_ROUTE, codes_for
from deblur.service.openapi import DOCS_ASSETS, OPERATIONS
from serving_support import PARAMS, ROOT, encode, make_artifact, running_server, smooth_rgb

sys.path.insert(0, str(ROOT / "scripts"))
from build_function_package import build_package  # noqa: E402

LIMITS = {"max_body_mb": 1, "max_pixels": 300_000, "min_side": 8, "max_side": 1000,
          "tile_size_range": (32, 320), "overlap_range": (0, 24), "refiner_steps_range": (1, 4)}
SERVICE_DIR = ROOT / "src" / "deblur" / "service"
CDN_HOSTS = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "fonts.googleapis.com", "fonts.gstatic.com")
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,negative_data_rejection,unsupported_method,allow_header_conformance")

# Loaded by the schemathesis process (SCHEMATHESIS_HOOKS): bodies of each image media type are real
# small images (so the 200 answer is checked too) or arbitrary bytes.
HOOKS = '''
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def image(fmt, mode, width, height, seed):
    pixels = bytes((k * 37 + seed) % 256 for k in range(width * height * len(mode)))
    buf = io.BytesIO()
    Image.frombytes(mode, (width, height), pixels).save(buf, format=fmt)
    return buf.getvalue()


SIZES = [("RGB", 8, 8), ("RGB", 33, 20), ("RGBA", 64, 48), ("L", 5, 40)]
for fmt, media in {MEDIA}.items():
    samples = [image(fmt, mode if fmt != "JPEG" else mode.replace("RGBA", "RGB"), w, h, seed)
               for seed, (mode, w, h) in enumerate(SIZES)]
    schemathesis.openapi.media_type(media, st.one_of(st.sampled_from(samples), st.binary(max_size=64)))
'''.replace("{MEDIA}", repr({fmt: Image.MIME[fmt] for fmt in ACCEPTED_FORMATS}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """With kernel-aware settings, default mode fast (params.yaml's may be thorough): ``mode`` is in the contract."""
    return make_artifact(tmp_path_factory.mktemp("openapi"), serving=LIMITS, kernel_aware={"default_mode": "fast"})


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client) -> dict:
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    return response.json()


def raised_error_codes() -> tuple[set[tuple[int, str]], list[str]]:
    """``(status, code)`` of each ``ApiError(...)``/``error_response(...)`` in the service; calls without literals."""
    found, unchecked = set(), []
    for path in sorted(SERVICE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name not in ("ApiError", "error_response"):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            status = node.args[0] if node.args else keywords.get("status")
            code = node.args[1] if len(node.args) > 1 else keywords.get("code")
            if isinstance(status, ast.Constant) and isinstance(code, ast.Constant):
                found.add((status.value, code.value))
            elif path.name != "errors.py":   # errors.py passes codes on from ApiError and FRAMEWORK_CODES
                unchecked.append(f"{path.name}:{node.lineno}")
    return found, unchecked


def documented_codes(spec: dict, route: str, status: int) -> list[str]:
    """The ``error`` enum the spec gives ``route`` for ``status`` (``NO_ROUTE``: the shared 404/405 responses)."""
    if route == NO_ROUTE:
        responses = list(spec["components"]["responses"].values())
    else:
        method, path = route.split(" ", 1)
        responses = [spec["paths"][path][method.lower()]["responses"].get(str(status))]
    for response in filter(None, responses):
        schema = response["content"]["application/json"]["schema"]
        assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}
        codes = schema["allOf"][1]["properties"]["error"]["enum"]
        if all(ERROR_CODES[code].status == status for code in codes):
            return codes
    return []


def test_every_error_code_raised_is_in_the_catalogue_the_spec_and_the_docs(spec):
    raised, unchecked = raised_error_codes()
    assert not unchecked, f"ApiError/error_response without a literal status and code at {unchecked}"
    raised |= {(status, code) for status, code in FRAMEWORK_CODES.items()}
    assert (503, "busy") in raised and (415, "unsupported_media_type") in raised and len(raised) >= 15
    for status, code in sorted(raised):
        entry = ERROR_CODES.get(code)
        assert entry is not None and entry.status == status, \
            f"({status}, {code!r}) is raised but not in deblur.service.errors.ERROR_CODES"
        for route in entry.routes:
            routes = list(OPERATIONS) if route == EVERY_ROUTE else [route]
            for one in routes:
                assert code in documented_codes(spec, one, status), f"{code} missing from {one} {status} in the spec"
    never_raised = set(ERROR_CODES) - {code for _, code in raised}
    assert not never_raised, f"catalogued but raised nowhere: {never_raised}"

    table = (ROOT / "documentation" / "serving.md").read_text(encoding="utf-8")
    rows = [line.split("|") for line in table.splitlines() if re.match(r"^\| *\d{3}\b", line)]
    documented = {(int(status), code) for row in rows for status in re.findall(r"\d{3}", row[1])
                  for code in re.findall(r"`([a-z_]+)`", row[2])}
    for code, entry in ERROR_CODES.items():
        assert (entry.status, code) in documented, f"{entry.status} {code} missing from serving.md's error table"


def test_spec_describes_every_route(client, spec):
    operations = {f"{method.upper()} {path}": op for path, methods in spec["paths"].items()
                  for method, op in methods.items()}
    assert set(operations) == set(OPERATIONS), "a route without a contract in deblur.service.openapi.OPERATIONS"
    for route, operation in operations.items():
        assert operation["operationId"] and operation["summary"], route
        assert operation["responses"]["200"]["content"], route
        assert operation["responses"]["500"]["content"]["application/json"], route
        assert "Successful Response" not in json.dumps(operation), route   # FastAPI's placeholder
    health = operations["GET /api/health"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert health == {"$ref": "#/components/schemas/Health"}
    real = client.get("/api/health").json()
    properties = spec["components"]["schemas"]["Health"]["properties"]
    assert set(real) == set(properties), "a /api/health key missing from openapi.HEALTH_SCHEMA"
    assert set(real["limits"]) <= set(properties["limits"]["properties"])
    assert set(operations["GET /"]["responses"]["200"]["content"]) == {"text/html"}
    not_found = client.get("/api/nothing-here")
    assert not_found.status_code == 404 and not_found.json()["error"] == "not_found"
    assert {"NotFound", "MethodNotAllowed"} <= set(spec["components"]["responses"])


def test_deblur_operation_states_bodies_bounds_outputs_and_errors(spec):
    operation = spec["paths"]["/api/deblur"]["post"]
    body = operation["requestBody"]
    assert body["required"]
    assert set(body["content"]) == {"image/jpeg", "image/png", "image/webp", "image/tiff", "image/bmp", "image/gif",
                                    "application/octet-stream", "multipart/form-data"}
    assert body["content"]["image/png"]["schema"] == {"type": "string", "format": "binary"}
    form = body["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    assert form["properties"]["psf"]["format"] == "binary"   # optional: a known kernel, non-blind

    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {"format", "tile_size", "overlap", "seed", "steps", "mode", "return_psf"}
    assert all(p["in"] == "query" and not p["required"] for p in params.values())
    assert params["format"]["schema"]["enum"] == sorted(OUTPUT_FORMATS) == ["jpeg", "jpg", "png", "webp"]
    assert params["mode"]["schema"] == {"type": "string", "enum": ["fast", "thorough"], "default": "fast"}
    assert params["return_psf"]["schema"]["enum"] == ["0", "1", "false", "true"]
    bounds = {name: [params[name]["schema"]["minimum"], params[name]["schema"]["maximum"]]
              for name in ("tile_size", "overlap", "steps", "seed")}
    assert bounds == {"tile_size": [32, 320], "overlap": [0, 24], "steps": [1, 4], "seed": [0, MAX_SEED]}
    assert params["tile_size"]["schema"]["default"] == PARAMS.tiling.tile_size
    assert {"functionKey", "code"} == {k for req in operation["security"] for k in req}
    assert spec["components"]["securitySchemes"]["code"] == {**spec["components"]["securitySchemes"]["code"],
                                                            "type": "apiKey", "in": "query", "name": "code"}

    ok = operation["responses"]["200"]
    assert set(ok["content"]) - {"application/json"} == set(MEDIA_TYPES.values()) == {"image/png", "image/jpeg",
                                                                                      "image/webp"}
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Restoration"}
    assert {"image", "psf", "psf_npy", "chosen"} <= set(spec["components"]["schemas"]["Restoration"]["required"])
    assert {"X-Model-Name", "X-Model-Version", "X-Inference-Ms", "X-Image-Size", "X-Tile-Size", "X-Overlap",
            "X-Alpha", "X-Seed", "X-Steps", "X-Deblur-Mode", "X-Deblur-Chosen", "X-Deblur-Psf-Size",
            "Server-Timing"} <= set(ok["headers"])
    statuses = {int(s) for s in operation["responses"]} - {200}
    assert {400, 401, 413, 415, 500, 503} <= statuses
    assert statuses == {ERROR_CODES[c].status for c in codes_for(DEBLUR_ROUTE)}
    for status in statuses:
        assert documented_codes(spec, DEBLUR_ROUTE, status) == codes_for(DEBLUR_ROUTE, status)
    assert "Retry-After" in operation["responses"]["503"]["headers"]
    assert spec["components"]["schemas"]["Error"]["required"] == ["error", "detail"]


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls, self.scripts = [], []

    def handle_starttag(self, tag, attrs) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data) -> None:
        if "SwaggerUIBundle(" in data:
            self.scripts.append(data)


def test_docs_load_from_this_server_only(client):
    page = client.get("/api/docs", params={"code": "k3y'<"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text
    assert "k3y'<" not in page.text   # the key is URL-quoted: no way out of the HTML attribute or JS string
    refs = _References()
    refs.feed(page.text)
    spec_urls = [m for script in refs.scripts for m in re.findall(r"url: '([^']+)'", script)]
    assert len(spec_urls) == 1 and '"validatorUrl": null' in refs.scripts[0]   # no badge from validator.swagger.io
    fetched = {}
    for url in refs.urls + spec_urls:
        parts = urlparse(url)
        assert not parts.scheme and not parts.netloc and parts.path.startswith("/api/"), url   # Azure: only /api/*
        assert parse_qs(parts.query) == {"code": ["k3y'<"]}, url      # passes the function key on
        response = client.get(url)
        assert response.status_code == 200, url
        fetched[parts.path] = response
    assert set(fetched) == {f"/api/docs/{name}" for name in DOCS_ASSETS} | {"/api/openapi.json"}
    assert fetched["/api/openapi.json"].json()["openapi"].startswith("3.1")
    assert fetched["/api/docs/swagger-ui-bundle.js"].text.count("SwaggerUIBundle") >= 1
    css = fetched["/api/docs/swagger-ui.css"]
    assert css.headers["content-type"].startswith("text/css")
    css_urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", css.text)
    assert css_urls and all(u.startswith("data:") for u in css_urls)
    for response in fetched.values():
        assert not any(host in response.text for host in CDN_HOSTS), response.url
    missing = client.get("/api/docs/swagger-ui.js")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_spec_and_docs_need_no_torch(model_dir, tmp_path):
    """The ONNX runtime serves without torch: building the spec and the docs must not import it."""
    code = ("import sys\nfrom fastapi.testclient import TestClient\nfrom deblur.service.app import create_app\n"
            f"client = TestClient(create_app({str(model_dir)!r}, preload=False))\n"
            "assert client.get('/api/openapi.json').status_code == 200\n"
            "assert client.get('/api/docs').status_code == 200\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def run_schemathesis(location: str, base_url: str, tmp_path: Path,
                     *extra: str) -> tuple[subprocess.CompletedProcess, list]:
    """The CLI as its own process, bounded: deterministic, 100 examples an operation; its HAR log's entries."""
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS, encoding="utf-8")
    report = tmp_path / "report.har"
    command = [sys.executable, "-m", "schemathesis.cli", "run", location, "--url", base_url, "--checks", CHECKS,
               "--max-examples", "100", "--generation-deterministic", "--workers", "1", "--request-timeout", "30",
               "--no-color", "--report", "har", "--report-har-path", str(report), *extra]
    env = {"SCHEMATHESIS_HOOKS": str(hooks), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    entries = json.loads(report.read_text())["log"]["entries"] if report.exists() else []
    return result, entries


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_or_undocumented_answer(server, spec, tmp_path):
    result, entries = run_schemathesis(f"{server.url}/api/openapi.json", server.url, tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    answers = {(e["request"]["method"], urlparse(e["request"]["url"]).path, e["response"]["status"]) for e in entries}
    assert len(entries) >= 100
    assert not [a for a in answers if a[2] >= 500]
    # the run reached the success path of every operation, and the errors that need no special setup
    assert {("POST", "/api/deblur", 200), ("GET", "/api/health", 200), ("GET", "/api/ui", 200), ("GET", "/", 200),
            ("POST", "/api/deblur", 400), ("POST", "/api/deblur", 415), ("GET", "/api/deblur", 405)} <= answers

    # The same run fails once a status it meets is not documented (what it found in the old spec).
    undocumented = json.loads(json.dumps(spec))
    del undocumented["paths"]["/api/deblur"]["post"]["responses"]["415"]
    spec_file = tmp_path / "spec-without-415.json"
    spec_file.write_text(json.dumps(undocumented), encoding="utf-8")
    failed, _ = run_schemathesis(str(spec_file), server.url, tmp_path, "--max-failures", "1")
    assert failed.returncode != 0 and "Undocumented status code" in failed.stdout, failed.stdout[-4000:]


def test_a_real_upload_matches_the_documented_200(client, spec):
    """Headers and media type of real answers (PNG with alpha, JPEG by Accept) against the spec."""
    documented = spec["paths"]["/api/deblur"]["post"]["responses"]["200"]
    image = Image.fromarray(smooth_rgb(40, 56)).convert("RGBA")
    for params, accept, media in (({"format": "png", "tile_size": 32, "overlap": 8}, "*/*", "image/png"),
                                  ({}, "image/jpeg", "image/jpeg")):
        response = client.post("/api/deblur", params=params, content=encode(image, "PNG"),
                               headers={"content-type": "image/png", "accept": accept})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == media and media in documented["content"]
        for name, header in documented["headers"].items():
            if header.get("required"):
                assert name in response.headers, name
        assert response.headers["x-image-size"] == "56x40"
        assert response.headers["x-alpha"] in documented["headers"]["X-Alpha"]["schema"]["enum"]
    assert response.headers["x-alpha"] == "dropped"


def test_a_thorough_answer_matches_the_documented_json(client, spec):
    """``mode=thorough&return_psf=1`` (schemathesis rarely reaches its 200): the JSON against ``Restoration``,
    with a kernel (an 80x96 photo) and without one (under ``kernel_aware.min_side``), and the headers."""
    import jsonschema_rs   # schemathesis' own validator

    documented = spec["paths"]["/api/deblur"]["post"]["responses"]["200"]
    validator = jsonschema_rs.validator_for(spec["components"]["schemas"]["Restoration"])
    for height, width, has_kernel in ((80, 96, True), (40, 56, False)):
        response = client.post("/api/deblur", params={"mode": "thorough", "return_psf": "1"},
                               content=encode(Image.fromarray(smooth_rgb(height, width)), "PNG"))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json" and "application/json" in documented["content"]
        answer = response.json()
        validator.validate(answer)
        assert (answer["psf"] is not None) == has_kernel and (answer["width"], answer["height"]) == (width, height)
        for name, header in documented["headers"].items():
            if header.get("required"):
                assert name in response.headers, name
        assert response.headers["x-deblur-chosen"] in documented["headers"]["X-Deblur-Chosen"]["schema"]["enum"]
        assert response.headers["x-deblur-mode"] == "thorough"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_docs_render_in_a_browser_with_no_other_host(server):
    """Swagger UI draws every operation of the spec in headless Chromium; any request off this server is refused."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    origin = urlparse(server.url).netloc
    requested, refused = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()

            def only_this_server(route) -> None:
                url = urlparse(route.request.url)
                requested.append(route.request.url)
                if url.scheme in ("data", "blob") or url.netloc == origin:
                    route.continue_()
                else:
                    refused.append(route.request.url)
                    route.abort()

            page.route("**/*", only_this_server)
            page.goto(f"{server.url}/api/docs?code=k3y")
            page.wait_for_selector("#operations-default-deblur", timeout=30_000)
            operations = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
            assert sorted(operations) == ["/", "/api/deblur", "/api/health", "/api/ui"]
            assert "deblur" in page.inner_text(".info .title")
            page.click("#operations-default-deblur .opblock-summary")
            page.wait_for_selector("#operations-default-deblur .parameters")
            text = page.inner_text("#operations-default-deblur")
            assert "tile_size" in text and "maximum: 320" in text and "unsupported_media_type" in text
            # "Try it out" (on by default): upload a JPEG, execute, the live answer is a 200
            page.set_input_files("#operations-default-deblur input[type=file]", files=[{
                "name": "photo.jpg", "mimeType": "image/jpeg",
                "buffer": encode(Image.fromarray(smooth_rgb(40, 56)), "JPEG")}])
            page.click("#operations-default-deblur .execute")
            answer = "#operations-default-deblur .live-responses-table tbody .response-col_status"
            page.wait_for_selector(answer, timeout=60_000)
            status = page.inner_text(answer)
            assert status.strip().startswith("200"), status
        finally:
            browser.close()
    assert not refused, refused
    assert any("/api/openapi.json?code=k3y" in url for url in requested)


DOCS_THROUGH_FUNCTION = '''
import asyncio, json, re, sys
import azure.functions as func
import function_app

handler = function_app.app.get_functions()[0].get_user_function()


async def get(path):
    response = await handler(func.HttpRequest("GET", "http://localhost:7071" + path, body=b""), None)
    return response.status_code, response.mimetype, response.get_body()


async def main():
    status, mimetype, page = await get("/api/docs?code=k3y")
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.decode()) + re.findall(r"url: '([^']+)'", page.decode())
    answers = {url: (await get(url))[:2] for url in urls}
    spec = json.loads((await get("/api/openapi.json?code=k3y"))[2])
    return {"page": [status, mimetype], "answers": answers, "paths": sorted(spec["paths"])}

print(json.dumps(asyncio.run(main())))
'''


def test_docs_and_spec_come_from_the_function_package(model_dir, tmp_path):
    """The Azure Functions package serves the docs and their assets under /api/ (routePrefix "api") itself."""
    package = build_package(tmp_path / "pkg", model_dir)
    assert set(DOCS_ASSETS) <= {p.name for p in (package / "deblur" / "static" / "docs").iterdir()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
    env["PYTHONPATH"] = str(package)
    run = subprocess.run([sys.executable, "-c", DOCS_THROUGH_FUNCTION], cwd=package, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["page"][0] == 200 and report["page"][1].startswith("text/html")
    assert len(report["answers"]) == len(DOCS_ASSETS) + 1
    for url, (status, mimetype) in report["answers"].items():
        assert url.startswith("/api/") and url.endswith("?code=k3y") and status == 200, (url, status, mimetype)
    assert report["paths"] == ["/", "/api/deblur", "/api/health", "/api/ui"]
