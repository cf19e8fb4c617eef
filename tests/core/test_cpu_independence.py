"""Same bytes on every x86-64 CPU: the data stages (numpy) and the pipeline's torch settings.

Most of these machines have AVX2 but not AVX-512; there, running with and without
``NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL"`` runs AVX2 code both times, so the pinned
digests below (written on an AVX2 machine) are what an AVX-512 machine is checked against, and
the third run, with numpy's AVX2 loops disabled too, is the check with teeth on AVX2 machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from deblur.core import portable_math as pm
from deblur.core.reproducible import AVX2_CAPS, cpu_has_avx2, pin_vector_unit

# Written on an AVX2 machine (commit of this test); an AVX-512 machine must print the same.
PORTABLE_MATH_DIGEST = "d136ba7b37178a695a8971dd742b60beb4ec21df982199ad3a7594305ed9029a"
PAIRS_DIGEST = "aa494207426c5c86"          # = test_noise_degradation's: portable math kept these bytes
CPU_LIMITS = {"unlimited": None, "no AVX-512": "X86_V4 AVX512_ICL", "no AVX2 nor AVX-512": "X86_V3 X86_V4 AVX512_ICL"}


def test_portable_math_gives_pinned_bits():
    x = np.random.default_rng(11).uniform(-30, 30, 20000)
    y = np.abs(x) / 30
    h = hashlib.sha256()
    for arr in (pm.exp(x), pm.log(y + 1e-9), pm.power(y, 1 / 2.2), pm.power(y, 2.2), pm.sin(x), pm.cos(x)):
        h.update(arr.tobytes())
    assert h.hexdigest() == PORTABLE_MATH_DIGEST


def test_portable_math_is_as_accurate_as_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(-40, 40, 50000)
    y = np.concatenate([rng.uniform(1e-6, 10, 50000), np.arange(256) / 255.0])
    t = rng.uniform(-1000, 1000, 50000)
    assert np.max(np.abs(pm.exp(x) / np.exp(x) - 1)) < 1e-15
    assert np.max(np.abs(pm.log(y[y > 0]) - np.log(y[y > 0]))) < 1e-14
    assert np.max(np.abs(pm.power(y, 1 / 2.2) - np.power(y, 1 / 2.2))) < 1e-15
    assert np.max(np.abs(pm.sin(t) - np.sin(t))) < 1e-12
    assert np.max(np.abs(pm.cos(t) - np.cos(t))) < 1e-12
    assert pm.power(np.array([0.0, 1.0]), 2.2).tolist() == [0.0, 1.0]
    assert pm.log(np.array([0.0]))[0] == -np.inf
    with pytest.raises(ValueError, match="100000"):
        pm.sin(np.array([2e5]))


@pytest.mark.slow
def test_data_stages_give_the_same_bytes_whatever_numpy_dispatches(tmp_path):
    digests = {}
    for label, limit in CPU_LIMITS.items():
        env = {k: v for k, v in os.environ.items() if k != "NPY_DISABLE_CPU_FEATURES"}
        if limit:
            env["NPY_DISABLE_CPU_FEATURES"] = limit
        out = tmp_path / "probe"       # the same path each time: the manifest lists absolute paths
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cpu_features_probe.py"), str(out)], env=env,
                              cwd=ROOT / "tests", capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert digests["no AVX-512"] == digests["unlimited"], digests
    assert digests["no AVX2 nor AVX-512"] == digests["unlimited"], digests
    assert digests["unlimited"]["pairs"] == PAIRS_DIGEST


def test_pipeline_caps_torch_at_avx2_where_the_cpu_has_it(tmp_path):
    code = "import deblur.cli, torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k not in AVX2_CAPS}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("AVX2" if cpu_has_avx2() else proc.stdout.strip())


def test_pin_vector_unit_leaves_user_settings_alone():
    environ = {"ATEN_CPU_CAPABILITY": "default"}
    added = pin_vector_unit(environ)
    if cpu_has_avx2():
        assert environ["ATEN_CPU_CAPABILITY"] == "default"
        assert added == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
    else:
        assert added == {}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    with_avx2 = tmp_path / "a"
    with_avx2.write_text("processor : 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n")
    without = tmp_path / "b"
    without.write_text("processor : 0\nflags\t\t: fpu sse2 avx\n")
    assert cpu_has_avx2(with_avx2) and not cpu_has_avx2(without)
    assert not cpu_has_avx2(tmp_path / "missing")
