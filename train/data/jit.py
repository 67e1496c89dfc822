"""numba's `register_jitable` when numba is installed (the ffcv extra), else a no-op: the helpers it marks then run
as plain Python (the imagefolder backend needs no numba)."""

from __future__ import annotations

from collections.abc import Callable

try:  # numba comes with the ffcv extra; without it the augmentation helpers below run as plain Python
    from numba.extending import register_jitable
except ImportError:  # pragma: no cover - depends on the environment

    def register_jitable(fn: Callable) -> Callable:
        return fn
