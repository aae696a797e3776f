"""Exporter throughput and memory: objects.parquet and QuPath GeoJSON from synthetic nuclei.

Usage::

    nice -n 10 python benchmarks/bench_export.py            # 200,000 and 800,000 objects
    nice -n 10 python benchmarks/bench_export.py --objects 50000
    nice -n 10 python benchmarks/bench_export.py --compare ce947a4 --objects 50000  # before vs after

Each size runs in its own subprocess, so each peak RSS (``ru_maxrss``) is that size's alone.
Objects have the shapes of real output (``segment`` on real tissue: ~15 vertices per nucleus,
~325 per gland): 15-vertex nuclei plus one 325-vertex gland per ``NUCLEI_PER_GLAND`` nuclei,
generated lazily batch by batch (the generator itself holds one batch). Throughputs exclude the time spent generating the synthetic batches and are given per
wall-clock second and per CPU second (process time: on shared cores the wall clock measures the
neighbours too). Printed: features/s for the table and for GeoJSON, peak RSS per size, and the
RSS ratio of the 4x run to the 1x run.

Batches carry their WKB, as `segment`'s chunk processes hand them to the table (which then
neither re-validates nor re-encodes them); ``--shapely`` hands it shapely polygons only.

``--compare REV`` instead times the table and GeoJSON writers of git revision REV against the
working tree's in one process, alternately, best of ``--rounds`` (so that both see the same load),
prints rows/s and features/s per CPU second of each and checks that both GeoJSON files are identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

log = logging.getLogger("bench_export")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


NUCLEI_PER_GLAND = 300  # CMU-1-Small-Region: 2,880 nuclei and 10 glands
VERTICES = {"nuclei": 15, "gland": 325}


def _real_shaped(n_objects: int, batch_size: int):
    """``n_objects`` synthetic objects: 15-vertex nuclei and, among them, 325-vertex glands, each
    batch carrying its WKB as `segment`'s chunk processes hand it to the table (made there, so
    not timed here); ``--shapely`` leaves it out (the table then validates and encodes them)."""
    import shapely

    for batch in _synthetic(n_objects, batch_size):
        if not SHAPELY_ONLY:
            batch.wkb = shapely.to_wkb(batch.geometry)
        yield batch


#: batches without WKB (set by ``--shapely``)
SHAPELY_ONLY = False


def _synthetic(n_objects: int, batch_size: int):
    """The synthetic nuclei, then glands."""
    import itertools

    from wsi_mtl.export import synthetic_batches

    n_glands = n_objects // (NUCLEI_PER_GLAND + 1)
    nuclei = synthetic_batches(n_objects - n_glands, batch_size=batch_size, tasks=("nuclei",), vertices=VERTICES["nuclei"],
                               extent_px=200_000.0, seed=0)
    glands = synthetic_batches(n_glands, batch_size=batch_size, tasks=("gland",), vertices=VERTICES["gland"],
                               extent_px=200_000.0, seed=1) if n_glands else iter(())
    return itertools.chain(nuclei, glands)


def child(n_objects: int, out_dir: Path, *, batch_size: int) -> dict[str, float]:
    """Write the table and the GeoJSON for ``n_objects`` real-shaped synthetic objects; return the figures."""
    from wsi_mtl.export import write_geojson, write_geojson_files, write_table

    gen_s = gen_cpu = 0.0

    def timed_batches():
        nonlocal gen_s, gen_cpu
        it = _real_shaped(n_objects, batch_size)
        while True:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                gen_s += time.perf_counter() - t0
                gen_cpu += time.process_time() - c0
            yield batch

    rss_start = _peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    table = out_dir / "objects.parquet"
    summary = write_table(timed_batches(), table, mpp=0.25)
    table_s = time.perf_counter() - t0 - gen_s
    table_cpu = time.process_time() - c0 - gen_cpu
    rss_table = _peak_rss_mb()

    c0 = time.process_time()
    (out_dir / "warm").mkdir()
    write_table(_real_shaped(20, 20), out_dir / "warm" / "t.parquet", mpp=0.25)
    write_geojson(out_dir / "warm" / "t.parquet", out_dir / "warm" / "t.geojson")  # loads numba's cached kernels, once per process
    kernel_load_cpu = time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    n = write_geojson(table, out_dir / "objects.geojson")
    geojson_s = time.perf_counter() - t0
    geojson_cpu = time.process_time() - c0
    rss_geojson = _peak_rss_mb()

    t0 = time.perf_counter()
    (out_dir / "set").mkdir()
    files = write_geojson_files(table, out_dir / "set")
    files_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    write_geojson(table, out_dir / "objects.geojson.gz", gz=True)
    gz_s = time.perf_counter() - t0

    assert summary.rows == n == n_objects
    return {
        "objects": n_objects,
        "generate_s": round(gen_s, 2),
        "table_s": round(table_s, 2),
        "table_features_per_s": round(n_objects / table_s),
        "table_features_per_cpu_s": round(n_objects / table_cpu),
        "geojson_kernel_load_cpu_s": round(kernel_load_cpu, 2),
        "geojson_s": round(geojson_s, 2),
        "geojson_features_per_s": round(n / geojson_s),
        "geojson_features_per_cpu_s": round(n / geojson_cpu),
        "geojson_mb": round((out_dir / "objects.geojson").stat().st_size / 1e6, 1),
        "geojson_set_features_per_s": round(n / files_s),
        "geojson_set_files": len(files),
        "geojson_gz_features_per_s": round(n / gz_s),
        "geojson_gz_mb": round((out_dir / "objects.geojson.gz").stat().st_size / 1e6, 1),
        "table_mb": round(table.stat().st_size / 1e6, 1),
        "rss_after_imports_mb": round(rss_start, 1),
        "rss_after_table_mb": round(rss_table, 1),
        "rss_after_geojson_mb": round(rss_geojson, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def _load_revision(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """The table and GeoJSON writer modules as they were at git revision ``rev``."""
    repo = Path(__file__).resolve().parents[1]
    modules = []
    for name in ("_table", "_geojson"):
        src = subprocess.run(["git", "show", f"{rev}:wsi_mtl/export/{name}.py"], cwd=repo, check=True,
                             capture_output=True, text=True).stdout
        module = types.ModuleType(f"wsi_mtl.export.{name}_at_{rev}")
        module.__package__ = "wsi_mtl.export"
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(src, f"{rev}:{name}.py", "exec"), module.__dict__)
        modules.append(module)
    return modules[0], modules[1]


def compare(n_objects: int, out_dir: Path, *, rev: str, batch_size: int, rounds: int) -> dict[str, float]:
    """CPU seconds of the writers at ``rev`` and in the working tree on the same objects, best of ``rounds``."""
    from wsi_mtl.export import _geojson, _table

    old_table, old_geojson = _load_revision(rev)
    batches = list(_real_shaped(n_objects, batch_size))
    table = out_dir / "objects.parquet"
    _table.write_table(iter(batches), table, mpp=0.25)  # both GeoJSON writers read this table
    best: dict[str, float] = {}
    for _ in range(rounds):
        for label, tab, geo in (("before", old_table, old_geojson), ("after", _table, _geojson)):
            c0 = time.process_time()
            tab.write_table(iter(batches), out_dir / f"{label}.parquet", mpp=0.25)
            c1 = time.process_time()
            geo.write_geojson(table, out_dir / f"{label}.geojson")
            c2 = time.process_time()
            best[f"table_{label}"] = min(best.get(f"table_{label}", 1e9), c1 - c0)
            best[f"geojson_{label}"] = min(best.get(f"geojson_{label}", 1e9), c2 - c1)
    identical = (out_dir / "before.geojson").read_bytes() == (out_dir / "after.geojson").read_bytes()
    figures: dict[str, float] = {"objects": n_objects, "geojson_identical": identical}
    for key, cpu in best.items():
        figures[key + "_per_cpu_s"] = round(n_objects / cpu)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=200_000, help="base number of objects (also run at 4x)")
    parser.add_argument("--batch-size", type=int, default=5_000, help="objects per synthetic batch")
    parser.add_argument("--compare", metavar="REV", default=None, help="time the writers of git revision REV against the working tree's")
    parser.add_argument("--rounds", type=int, default=2, help="--compare: best of this many rounds")
    parser.add_argument("--shapely", action="store_true",
                        help="hand the table shapely polygons only (as the Python API may), not the WKB segment hands it")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global SHAPELY_ONLY
    SHAPELY_ONLY = args.shapely

    if args.child is not None:
        print(json.dumps(child(args.child, args.out, batch_size=args.batch_size)))
        return
    if args.compare is not None:
        with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
            r = compare(args.objects, Path(tmp), rev=args.compare, batch_size=args.batch_size, rounds=args.rounds)
        print(f"{r['objects']:,} objects, per CPU second (best of {args.rounds}; {args.compare} -> working tree):")
        print(f"  table   {r['table_before_per_cpu_s']:>9,} -> {r['table_after_per_cpu_s']:>9,} rows/s (goal >= 200,000)")
        print(f"  GeoJSON {r['geojson_before_per_cpu_s']:>9,} -> {r['geojson_after_per_cpu_s']:>9,} features/s (goal >= 100,000); "
              f"identical output: {r['geojson_identical']}")
        return

    results = []
    for n in (args.objects, 4 * args.objects):
        with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
            cmd = [sys.executable, __file__, "--child", str(n), "--out", tmp, "--batch-size", str(args.batch_size),
                   *(["--shapely"] if args.shapely else [])]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"\n{r['objects']:,} objects")
        for key, value in r.items():
            if key != "objects":
                print(f"  {key:28s} {value}")
    base, big = results
    print(f"\npeak RSS {big['objects']:,} / {base['objects']:,} objects: {big['peak_rss_mb'] / base['peak_rss_mb']:.3f} (goal <= 1.2)")
    for r in results:
        print(f"{r['objects']:,} objects: table {r['table_features_per_s']:,} features/s wall, {r['table_features_per_cpu_s']:,} per CPU s; "
              f"GeoJSON {r['geojson_features_per_s']:,} features/s wall, {r['geojson_features_per_cpu_s']:,} per CPU s (goal >= 100,000; table >= 200,000)")
    print("(wall-clock figures depend on how many other processes share the cores; CPU-second figures much less)")


if __name__ == "__main__":
    main()
