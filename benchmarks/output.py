"""What every benchmark script writes besides its table: the machine it ran on and its JSON results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """The machine, as the results record it (the CPU's name, how many cores, the OS)."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()}


def write_json(path: Path | str | None, results: dict[str, Any]) -> None:
    """Write `results` to `path` as indented JSON (nothing when `path` is None) and say where."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
