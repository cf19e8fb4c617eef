"""The HTTP service: deblurs uploaded images (``python -m deblur.service``, also run by Azure Functions).

Modules, one concern each:

- ``app``: the FastAPI app, its routes and the health report;
- ``errors``: the JSON error answer and the catalogue of error codes;
- ``requests``: what a request asks for (query, Accept, API key) and its image bytes
  (body or multipart form), probed against the limits before any decoding;
- ``admission``: who gets to run, when and for how long: slots and queue, the speed
  model behind ``image_too_slow``, the memory budget, cancellation;
- ``runtime``: where the model comes from, loading it once, running one image;
- ``logs``: secrets redacted from every log line;
- ``server``: the uvicorn process (``python -m deblur.service``).

The contract and limits are in documentation/serving.md.
"""

from deblur.service.app import create_app

__all__ = ["create_app"]
