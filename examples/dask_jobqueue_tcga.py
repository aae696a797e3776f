"""Segment a TCGA cohort on a SLURM cluster with dask-jobqueue: the workers are SLURM jobs.

One Python process (on a login node, or in a small long-running job) holds the Dask scheduler and
submits ``--jobs`` SLURM jobs, each running one Dask worker per GPU. Every worker loads the model
once and then takes slides until none are left; a worker whose job ends (walltime, pre-emption)
is replaced by a new job and its slide is taken over once its lock goes stale.

A GDC download (``gdc-client download -m manifest.txt``) puts each slide in a folder named by its
file UUID: ``gdc/<uuid>/TCGA-AA-3512-01Z-00-DX1.<uuid>.svs``. ``--make-manifest`` writes a CSV that
names each result folder by the slide's TCGA barcode instead::

    python examples/dask_jobqueue_tcga.py --make-manifest gdc/ tcga_coad.csv
    python examples/dask_jobqueue_tcga.py tcga_coad.csv results/tcga_coad \\
        --partition gpu --account my_lab --jobs 8 --gpus-per-job 1 --walltime 12:00:00

The same batch from the command line::

    wsimtl batch tcga_coad.csv -o results/tcga_coad --executor slurm --partition gpu \\
        --account my_lab --jobs 8 --gpus-per-job 1 --cores 8 --memory 32GB --walltime 12:00:00

Run it again to continue an interrupted cohort: finished slides are skipped.

The workers a batch starts are not daemonic, so each slide's post-processing runs in a process
pool inside its job, as on a workstation (workers of a cluster started elsewhere, daemonic by
Dask's default, use threads); each run.json records which as ``parameters.postprocess_pool``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

from wsi_mtl.cohort import SegmentOptions, SlurmOptions, describe, run_batch


def make_manifest(download_dir: Path, manifest: Path) -> int:
    """Write ``slide,id`` rows for every ``.svs`` under ``download_dir``; id = the TCGA barcode."""
    slides = sorted(download_dir.rglob("*.svs"))
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "id"])
        for slide in slides:
            writer.writerow([slide.resolve(), slide.name.split(".")[0]])
    print(f"{len(slides)} slides -> {manifest}")
    return 0 if slides else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="CSV manifest (slide,id[,mpp]), folder or glob")
    parser.add_argument("out", nargs="?", default="wsimtl-results", help="output folder")
    parser.add_argument("--make-manifest", action="store_true", help="write MANIFEST's slides (a GDC download folder) to OUT as a CSV")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs running workers")
    parser.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per job (0: CPU workers)")
    parser.add_argument("--cores", type=int, default=8, help="CPUs per job (slide reading, post-processing)")
    parser.add_argument("--memory", default="32GB", help="memory per job")
    parser.add_argument("--walltime", default="12:00:00")
    parser.add_argument("--interface", default=None, help="network interface shared by scheduler and workers (ib0, eth0; lo on one node)")
    parser.add_argument("--prologue", action="append", default=[], help="shell line run before each worker, e.g. 'module load cuda'")
    parser.add_argument("--model", default=None, help="model name or folder (default: the shipped default)")
    parser.add_argument("--no-objects", action="store_true", help="maps only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("distributed", "dask_jobqueue", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.make_manifest:
        return make_manifest(Path(args.manifest), Path(args.out))

    slurm = SlurmOptions(
        partition=args.partition,
        account=args.account,
        walltime=args.walltime,
        memory=args.memory,
        cores=args.cores,
        gpus_per_job=args.gpus_per_job,
        jobs=args.jobs,
        interface=args.interface,
        prologue=tuple(args.prologue),
    )
    options = SegmentOptions(model=args.model, device="cuda" if args.gpus_per_job else "cpu", objects=not args.no_objects)
    result = run_batch([args.manifest], args.out, options=options, executor="slurm", slurm=slurm)
    print(describe(result))
    for outcome in result.failed:
        print(f"failed: {outcome.id}: {outcome.error}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
