"""``python -m deblur.service``: the HTTP service as one uvicorn worker on this machine."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from deblur.service.logs import RedactSecrets, uvicorn_log_config

# glibc hands large freed blocks back to the OS, so every tile batch faults its activation
# buffers in anew: 20-40 % of the CPU time of a request on this machine. These keep blocks
# up to 256 MB in the heap. glibc reads them at process start only (on Azure: app settings).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def restart_with_malloc_settings(argv: list[str]) -> None:
    """Re-execute this command once with MALLOC_ENV added (values already set are kept)."""
    if sys.platform != "linux" or all(k in os.environ for k in MALLOC_ENV):
        return
    env = {**MALLOC_ENV, **os.environ}
    os.execve(sys.executable, [sys.executable, "-m", "deblur.service", *argv], env)


def main(argv: list[str] | None = None) -> None:
    """Serve the app with uvicorn on one worker."""
    import uvicorn

    from deblur.service.app import create_app

    parser = argparse.ArgumentParser(prog="python -m deblur.service",
                                     description="Serve the deblurring HTTP API and web page.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--model-dir", default=None, help="serving artifact folder (default: from the environment)")
    parser.add_argument("--no-preload", action="store_true", help="load the model on the first request")
    parser.add_argument("--keep-malloc", action="store_true", help="do not restart with MALLOC_ENV (see source)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.keep_malloc:
        restart_with_malloc_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    app = create_app(args.model_dir, preload=not args.no_preload)
    print(f"deblur: serving http://{args.host}:{args.port}/ (model: {app.state.holder.source.describe()})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="info", log_config=uvicorn_log_config())
