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


class ProcessTree:
    """Samples this process's descendants with psutil (pool workers started by a forkserver are
    grandchildren, so ``RUSAGE_CHILDREN`` misses them): the largest RSS of any one of them, the
    peak of this process plus all of them, as RSS (``total_mb``: the pages of shared libraries
    counted once per process) and as anonymous memory (``anon_total_mb``: RSS less file-backed and
    shared pages, close to what a memory cgroup's limit counts for the job), and the CPU seconds
    each used (at its last sample), also by what each does (:meth:`cpu_by_role`)."""

    def __init__(self, every_s: float = 0.05) -> None:
        import threading

        import psutil

        self._me = psutil.Process()
        self._cpu: dict[int, float] = {}
        self._role: dict[int, str] = {}
        self.largest_child_mb = self.total_mb = self.anon_total_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        import psutil

        while not self._stop.is_set():
            mine = self._me.memory_info()
            total, anon = mine.rss / 2**20, (mine.rss - mine.shared) / 2**20
            for p in self._me.children(recursive=True):
                try:
                    t, info = p.cpu_times(), p.memory_info()
                    self._role[p.pid] = _role(p)
                except psutil.Error:  # exited meanwhile
                    continue
                self._cpu[p.pid] = t.user + t.system
                self.largest_child_mb = max(self.largest_child_mb, info.rss / 2**20)
                total += info.rss / 2**20
                anon += (info.rss - info.shared) / 2**20
            self.total_mb = max(self.total_mb, total)
            self.anon_total_mb = max(self.anon_total_mb, anon)
            self._stop.wait(every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> float:
        """CPU seconds of the descendants seen."""
        return sum(self._cpu.values())

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the descendants seen, by what they do: the name wsimtl gives its worker
        processes (``chunks``, ``labels``, ``geojson``), ``start-up`` for the forkserver they are
        forked from (imports and the compiled kernels' warm-up), ``other`` for the rest."""
        out: dict[str, float] = {}
        for pid, cpu in self._cpu.items():
            role = self._role.get(pid, "other")
            out[role] = out.get(role, 0.0) + cpu
        return out


def _role(p) -> str:  # noqa: ANN001 - a psutil.Process
    """What a descendant does, from its process name or, for an unnamed one, its command line."""
    name = p.name()
    if name.startswith("wsimtl-"):
        return name[len("wsimtl-"):]
    return "start-up" if "forkserver" in " ".join(p.cmdline()) else "other"
