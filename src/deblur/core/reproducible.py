"""Same pipeline bytes on every x86-64 machine: pin what torch's CPU arithmetic depends on.

torch sums in a different order with another vector unit (its AVX-512 kernels, oneDNN's JIT
code for AVX-512, MKL's code paths) and with another number of threads, so the same training
run gave other weights on an AVX-512 machine or with more cores (measured: a NAFNet-16 after
three AdamW steps differs between 1 and 2 threads, between ATen's AVX2 and default kernels and
between oneDNN's AVX2 and SSE4.1 code). Pipeline stages cap the vector unit at AVX2, which
every x86-64 CPU of the last decade has, and train with ``train.cpu_threads`` threads. numpy's
part is ``deblur.core.portable_math``.

The variables are read when torch loads its kernels: ``pin_vector_unit`` runs before torch is
imported (``deblur.cli``, imported first by every pipeline script). A variable the user set is
left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

AVX2_CAPS = {
    "ATEN_CPU_CAPABILITY": "avx2",   # torch's own kernels (default: the best the CPU has)
    "ONEDNN_MAX_CPU_ISA": "AVX2",     # oneDNN convolutions (a ceiling: safe on any CPU)
    "MKL_CBWR": "AVX2",               # MKL's conditional numerical reproducibility branch
}


def cpu_has_avx2(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU reports AVX2 and FMA (x86-64-v3); False when it cannot tell."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def pin_vector_unit(environ: dict | None = None) -> dict[str, str]:
    """Set the AVX2 ceilings in ``environ`` (default ``os.environ``) where unset; returns what was set.

    Only on CPUs with AVX2: asking torch for AVX2 kernels on a CPU without them would crash.
    """
    environ = os.environ if environ is None else environ
    if not cpu_has_avx2():
        return {}
    added = {k: v for k, v in AVX2_CAPS.items() if k not in environ}
    environ.update(added)
    return added


def pin_threads(threads: int) -> None:
    """torch intra-op threads for a pipeline stage; 0 leaves torch's default (all cores)."""
    if threads > 0:
        import torch   # imported here: deblur.cli (torch-free) imports this module

        torch.set_num_threads(threads)
