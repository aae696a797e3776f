"""``wsimtl batch``: options reach the library, failures give exit code 3, bad options exit early.

The per-slide function and the model loader are replaced by the fakes of tests/test_cohort.py
(monkeypatched into wsi_mtl.pipeline / wsi_mtl.network), so these tests need no network run;
tests/test_cohort_e2e.py runs the command on real slides.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_cohort import LOG_ENV, fake_load_model, fake_segment, fresh_models, log_lines  # noqa: F401 - autouse fixture
from wsi_mtl.cli import cli, main


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import wsi_mtl.network
    import wsi_mtl.pipeline

    monkeypatch.setattr(wsi_mtl.pipeline, "segment_slide", fake_segment)
    monkeypatch.setattr(wsi_mtl.network, "load_model", fake_load_model)
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    log = tmp_path / "calls.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    return log


@pytest.fixture()
def slides(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.svs").write_bytes(b"OK")
    (folder / "bad.svs").write_bytes(b"BAD")
    return folder


def _statuses(out: Path) -> dict[str, str]:
    with (out / "batch_summary.csv").open(newline="") as fh:
        return {row["id"]: row["status"] for row in csv.DictReader(fh)}


def test_failures_exit_3_and_rerun_skips(fakes: Path, slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["batch", str(slides), "-o", str(out), "--device", "cpu"])
    assert info.value.code == 3
    captured = capsys.readouterr()
    assert "3 done, 0 skipped, 1 failed" in captured.out
    assert "failed: bad: bad.svs is not a slide (truncated)" in captured.err
    assert f"wsimtl: error: 1 of 4 slides failed; see {out / 'batch_summary.csv'}" in captured.err
    assert _statuses(out) == {"a": "done", "b": "done", "bad": "failed", "c": "done"}

    main(["batch", str(slides / "[abc].svs"), "-o", str(out), "--device", "cpu", "-q"])  # returns: exit code 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _statuses(out) == {"a": "skipped", "b": "skipped", "bad": "failed", "c": "skipped"}
    assert Counter(s[0] for s in log_lines(fakes, "segment")) == {"a.svs": 1, "b.svs": 1, "c.svs": 1, "bad.svs": 1}


def test_options_pass_through(fakes: Path, slides: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,id,mpp\n{slides / 'a.svs'},case-a,0.25\n")
    out = tmp_path / "out"
    (tmp_path / "tiny").mkdir()  # a model folder: the (fake) loader reads it
    result = CliRunner().invoke(cli, ["batch", str(manifest), "-o", str(out), "--model", str(tmp_path / "tiny"), "--device", "cpu", "--precision", "fp32",
                                      "--batch-size", "3", "--tile-size", "128", "--tta", "4", "--no-objects", "--no-tissue-mask",
                                      "--postprocess", "nuclei_split_h=0", "-q"])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "case-a" / "a" / "run.json").read_text())
    assert run["mpp"] == 0.25 and run["model"] == str(tmp_path / "tiny") and run["device"] == "cpu"
    assert run["options"] == {"batch_size": 3, "objects": False, "precision": "fp32", "tile_size": 128, "tissue_mask": False, "tta": 4, "workers": None,
                              "postprocess": {"nuclei_split_h": 0.0}}


def test_shard_option_and_job_array_environment(fakes: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["batch", str(slides), "-o", str(tmp_path / "o1"), "--device", "cpu", "--shard", "1/2", "-q"])
    assert result.exit_code == 0, result.output
    assert _statuses(tmp_path / "o1") == {"b": "done", "c": "done"}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    with pytest.raises(SystemExit) as info:
        main(["batch", str(slides), "-o", str(tmp_path / "o2"), "--device", "cpu", "-q"])
    assert info.value.code == 3
    assert _statuses(tmp_path / "o2") == {"a": "done", "bad": "failed"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "2/2"], "shard '2/2' needs 0 <= i < n"),
        (["--devices", ","], "give devices such as cuda:0,cuda:1"),
        (["--executor", "nope"], "'nope' is not one of"),
        (["--lock-timeout", "0"], "--lock-timeout"),
    ],
)
def test_bad_options_are_usage_errors(fakes: Path, slides: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["batch", str(slides), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--executor", "dask", "--devices", "cuda:0,cuda:1"], "--devices is for the local executor"),
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --executor dask"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--executor", "slurm", "--walltime", "soon"], "walltime 'soon'"),
        (["--postprocess", "nuclei_split_hh=0"], "unknown post-processing setting 'nuclei_split_hh'"),
    ],
)
def test_inconsistent_options_are_input_errors(fakes: Path, slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["batch", str(slides), "-o", str(tmp_path / "out"), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_input_is_an_input_error(fakes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["batch", str(tmp_path / "nothing.svs"), "-o", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "slide, folder or manifest not found" in capsys.readouterr().err


def test_help_lists_the_executors() -> None:
    result = CliRunner().invoke(cli, ["batch", "--help"])
    assert result.exit_code == 0
    for word in ("--executor", "--scheduler", "--partition", "--gpus-per-job", "--shard", "--lock-timeout", "batch_summary.csv"):
        assert word in result.output


def test_model_without_weights_is_refused_before_any_slide(fakes: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WSIMTL_MODELS_DIR", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["batch", str(slides), "-o", str(tmp_path / "out"), "--model", "cerberus_r34", "-q"])
    assert info.value.code == 20
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model cerberus-r34 has no trained weights" in err and "--allow-untrained" in err
    assert not (tmp_path / "out").exists() and not log_lines(fakes, "segment")
    result = CliRunner().invoke(cli, ["batch", str(slides / "a.svs"), "-o", str(tmp_path / "out"), "--model", "cerberus-r34",
                                      "--allow-untrained", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert _statuses(tmp_path / "out") == {"a": "done"}


def test_old_workers_spelling_still_sets_the_dask_workers(fakes: Path, slides: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsi_mtl.cohort

    seen: dict = {}

    def fake_run_batch(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(wsi_mtl.cohort, "run_batch", fake_run_batch)
    for option in ("--dask-workers", "--workers"):
        seen.clear()
        result = CliRunner().invoke(cli, ["batch", str(slides), "-o", str(tmp_path / "out"), "--executor", "dask", option, "3", "-q"])
        assert result.exit_code == 0, result.output
        assert seen["workers"] == 3 and seen["executor"] == "dask"
        assert ("--workers is deprecated; use --dask-workers" in result.output) == (option == "--workers")
