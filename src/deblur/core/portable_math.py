"""Elementary functions that give the same bits on every x86-64 CPU.

numpy picks ``power``, ``exp``, ``log``, ``sin`` and ``cos`` loops at run time by CPU features:
on AVX-512 machines ``power`` runs Intel's SVML, elsewhere the C library's ``pow``; ``exp``,
``log``, ``sin`` and ``cos`` have AVX2 and AVX-512 variants of their own. Their results differ
in the last bits, and after rounding to 8 bits a few pixels differ, so data written on one
machine did not match data written on another (``numpy.lib.introspect.opt_func_info`` lists
the variants). The functions here use only operations that IEEE 754 rounds exactly (``+ - * /``,
``rint``, ``ldexp``, ``frexp``), one numpy call per operation, so they cannot depend on which
SIMD variant runs. They work in float64 (relative error below 1e-15 on the ranges used here)
and return float64; callers cast as before.
"""

from __future__ import annotations

import numpy as np

_LN2_HI = 6.93147180369123816490e-01      # ln 2 split so that n * _LN2_HI is exact for |n| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
_EXP_TERMS = 14                           # Taylor terms of exp on |r| <= ln2 / 2: error < 1e-17
_SQRT_HALF = 0.70710678118654752440
_LOG_TERMS = 12                           # odd terms of atanh on |s| <= 0.172: error < 1e-18
_PIO2_1 = 1.57079632673412561417e+00      # pi / 2 in three parts (fdlibm's), exact products for |k| < 2**20
_PIO2_2 = 6.07710050650619224932e-11
_PIO2_3 = 2.02226624879595063154e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
_TRIG_TERMS = 11                          # Taylor terms of sin and cos on |r| <= pi / 4: error < 1e-18
_MAX_TRIG_ARGUMENT = 1e5                  # beyond this the three-part reduction loses bits


def exp(x) -> np.ndarray:
    """e**x elementwise."""
    x = np.asarray(x, np.float64)
    n = np.rint(x * _INV_LN2)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    series = _horner(r, [1.0 / _factorial(k) for k in range(_EXP_TERMS)])
    return np.ldexp(series, n.astype(np.int32))


def log(x) -> np.ndarray:
    """Natural logarithm elementwise (x > 0; 0 gives -inf)."""
    x = np.asarray(x, np.float64)
    mantissa, exponent = np.frexp(x)                       # x = m * 2**e, m in [0.5, 1)
    small = mantissa < _SQRT_HALF
    mantissa = np.where(small, mantissa * 2.0, mantissa)   # m in [sqrt(1/2), sqrt(2))
    exponent = exponent - small
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = _horner(s2, [1.0 / (2 * k + 1) for k in range(_LOG_TERMS)])
    result = exponent * _LN2_HI + (2.0 * s * series + exponent * _LN2_LO)
    return np.where(x > 0, result, -np.inf)


def power(x, y) -> np.ndarray:
    """x**y elementwise for x >= 0 (0**y = 0 for y > 0)."""
    x = np.asarray(x, np.float64)
    return np.where(x > 0, exp(np.asarray(y, np.float64) * log(np.where(x > 0, x, 1.0))), 0.0)


def sin(x) -> np.ndarray:
    """Sine elementwise, |x| <= 1e5."""
    return _sin_cos(x, quarter_turns=0)


def cos(x) -> np.ndarray:
    """Cosine elementwise, |x| <= 1e5."""
    return _sin_cos(x, quarter_turns=1)


def _sin_cos(x, quarter_turns: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.size and np.abs(x).max() > _MAX_TRIG_ARGUMENT:
        raise ValueError(f"portable sin/cos take |x| <= {_MAX_TRIG_ARGUMENT:g}, got {np.abs(x).max():g}")
    k = np.rint(x * _TWO_OVER_PI)
    r = ((x - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3   # x = k * pi/2 + r, |r| <= pi/4
    r2 = r * r
    sin_r = r * _horner(r2, [(-1) ** j / _factorial(2 * j + 1) for j in range(_TRIG_TERMS)])
    cos_r = _horner(r2, [(-1) ** j / _factorial(2 * j) for j in range(_TRIG_TERMS)])
    quadrant = (k.astype(np.int64) + quarter_turns) % 4    # cos(x) = sin(x + pi/2)
    return np.select([quadrant == 0, quadrant == 1, quadrant == 2], [sin_r, cos_r, -sin_r], -cos_r)


def _horner(t: np.ndarray, coefficients: list[float]) -> np.ndarray:
    """sum(c_k * t**k), highest power first; one rounding per multiply and per add."""
    result = np.full_like(t, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * t + c
    return result


def _factorial(n: int) -> float:
    out = 1.0
    for k in range(2, n + 1):
        out *= k
    return out
