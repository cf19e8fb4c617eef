"""Azure Functions entry point (Python v2 programming model).

One HTTP function, ``http_app_func``, with the catch-all route ``/{*route}`` under
host.json's ``routePrefix`` ("api"): Azure hands every request to the FastAPI app of
``deblur.service`` with its full path, so ``/api/deblur``, ``/api/health`` and ``/api/ui``
reach the app's routes of the same name. The model folder defaults to ``model/`` beside
this file (app setting ``DEBLUR_MODEL_DIR`` overrides it).
"""

import os
from pathlib import Path

from deblur.core.runtime_env import prefer_passive_openmp

prefer_passive_openmp()   # OMP_WAIT_POLICY=PASSIVE before torch can load: the instance's cores are shared

import azure.functions as func  # noqa: E402

from deblur.service import create_app  # noqa: E402

os.environ.setdefault("DEBLUR_MODEL_DIR", str(Path(__file__).resolve().parent / "model"))

app = func.AsgiFunctionApp(app=create_app(), http_auth_level=func.AuthLevel.FUNCTION)
