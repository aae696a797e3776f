"""The malloc arena limit: set once per process, never over the user's $MALLOC_ARENA_MAX."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = "from wsi_mtl.malloc import limit_arenas; print(limit_arenas(), limit_arenas())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env_extra
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_arena_limit_is_set_once_and_leaves_the_users_setting_alone() -> None:
    assert _run({}) == "True False"  # glibc accepts it; a second call does nothing
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "False False"
