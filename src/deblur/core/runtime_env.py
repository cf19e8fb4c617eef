"""Process settings that must be in place before torch, and the OpenMP runtime it loads, start.

OpenMP's default wait policy keeps a thread that finished its share of a parallel region
spinning on a core for the next one. On a machine whose cores are shared (a development
machine running other jobs, an Azure Functions instance), the spinning thread burns the
time slice that the thread it waits for needs: one 1280x720 photo took 9.6-11.5 s with two
torch threads beside a load of ~5, 2.0-2.4 s with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads
sleep). libgomp reads the variable once, when torch is imported, so the entry points call
``prefer_passive_openmp()`` before anything can import torch. A value already in the
environment wins. ONNX Runtime has its own thread pool: ``deblur.artifact.onnx_model`` turns its
spinning off with a session option.

Torch-free, and free of any deblur import: safe at the top of every entry point.
"""

from __future__ import annotations

import os
import sys

OPENMP_WAIT_POLICY = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it; False when torch is
    already imported (then OpenMP has read its setting and this call changes nothing in this process)."""
    os.environ.setdefault(OPENMP_WAIT_POLICY, PASSIVE)
    return "torch" not in sys.modules
