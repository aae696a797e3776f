"""Run a benchmark script again in a fresh process (``--child ...``) and read the JSON line it prints last.

A fresh process per measurement keeps one measurement's memory and caches out of the next one's
(peak RSS at 1x and 4x area is only meaningful that way).
"""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(script: str, *args: str) -> dict:
    """``python SCRIPT ARGS...``; its last stdout line parsed as JSON, or exit naming what failed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
