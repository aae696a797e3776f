"""Options shared by the commands mean one thing everywhere; arguments are checked before torch loads;
models without weights are refused; model names have one printed spelling; -vv is wsimtl's own debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from wsi_mtl.cli import _COMMANDS, cli, main
from wsi_mtl.cli._options import SHARED


#: The commands held to the shared options here (embed and probe take foreign checkpoints and files).
CHECKED = ("info", "segment", "export", "train", "evaluate", "batch", "models")


def _commands() -> dict[str, click.Command]:
    ctx = click.Context(cli)
    commands = {name: cli.get_command(ctx, name) for name in CHECKED if name in _COMMANDS}
    return {name: cmd for name, cmd in commands.items() if cmd is not None}


def _visible(cmd: click.Command) -> dict[str, click.Option]:
    return {opt: p for p in cmd.params if isinstance(p, click.Option) and not p.hidden for opt in p.opts}


def _signature(option: click.Option) -> tuple:
    return (option.help, option.opts, option.secondary_opts, option.is_flag, repr(option.type), repr(option.default), option.multiple)


def _reference() -> dict[str, tuple]:
    """Each spelling of each shared option (``-q`` and ``--quiet``) -> the shared definition's signature."""
    out = {}
    for decorator in SHARED.values():
        option = next(p for p in decorator(click.command("ref")(lambda **kw: None)).params if isinstance(p, click.Option))
        out.update({opt: _signature(option) for opt in option.opts})
    return out


def test_each_shared_option_is_the_same_in_every_command() -> None:
    reference = _reference()
    used: dict[str, set[str]] = {}
    for name, cmd in _commands().items():
        for opt, option in _visible(cmd).items():
            if opt in reference:  # a shared spelling is never a private option with another meaning
                assert _signature(option) == reference[opt], (name, opt)
                used.setdefault(opt, set()).add(name)
    assert used["--model"] == used["--allow-untrained"] == {"segment", "batch", "evaluate"}
    assert {"segment", "export"} == used["--workers"] and {"segment", "export"} == used["--geojson-gz"]
    assert {"info", "models", "evaluate"} == used["--json"]
    assert {"segment", "export", "batch", "evaluate", "train"} == used["--quiet"] == used["-q"]
    assert {"segment", "batch", "evaluate"} <= used["--precision"] and {"segment", "batch", "evaluate"} <= used["--tta"]
    assert {"segment", "batch"} == used["--out"] and {"segment", "export", "batch", "evaluate"} == used["--postprocess"]


@pytest.mark.parametrize(("command", "code", "message"), [("segment", "10", "slide not found: "),
                                                      ("batch", "2", "slide, folder or manifest not found: ")])
def test_missing_slide_fails_before_torch_is_imported(tmp_path: Path, command: str, code: str, message: str) -> None:
    script = ("import sys\nfrom wsi_mtl.cli import main\ntry:\n    main([sys.argv[1], sys.argv[2], '-o', sys.argv[3]])\n"
              "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script, command, str(tmp_path / "missing.svs"), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.split() == [code, "False"], proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"wsimtl: error: {message}{tmp_path / 'missing.svs'}"
    assert not (tmp_path / "out").exists()


def test_model_without_weights_is_refused_with_where_they_go(svs_jpeg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("WSIMTL_MODELS_DIR", str(models))
    for spelling in ("cerberus_r34", "cerberus-r34"):
        with pytest.raises(SystemExit) as info:
            main(["segment", str(svs_jpeg), "-o", str(tmp_path / "out"), "--model", spelling, "-q"])
        assert info.value.code == 20
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("wsimtl: error: model cerberus-r34 has no trained weights")
        assert str(models / "cerberus-r34") in err and "--allow-untrained" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_allow_untrained_runs_and_warns(he_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mtl import synthetic

    monkeypatch.setenv("WSIMTL_MODELS_DIR", str(tmp_path))
    slide = synthetic.write_svs(tmp_path / "s.svs", he_image[:256, :256], mpp=0.5, compression="jpeg", tile=256, levels=(1,))
    proc = subprocess.run([sys.executable, "-m", "wsi_mtl", "segment", str(slide), "-o", str(tmp_path / "out"), "--model", "cerberus_r34",
                           "--allow-untrained", "--no-objects", "--no-tissue-mask", "--tile-size", "256"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr
    run = json.loads((tmp_path / "out" / "s" / "run.json").read_text())
    assert run["status"] == "complete" and run["model"]["trained"] is False


def test_both_model_spellings_are_accepted_and_one_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_mtl.cli._options import check_model
    from wsi_mtl.errors import ModelError
    from wsi_mtl.network import get_model_config, model_names

    assert model_names() == ["cerberus-r34", "wsimtl-small"]
    for spelling in ("wsimtl_small", "wsimtl-small"):
        check_model(spelling, allow_untrained=False)  # the shipped model's folder is found under either spelling
        assert get_model_config(spelling).name == "wsimtl-small"
    with pytest.raises(ModelError, match="known models: cerberus-r34, wsimtl-small") as info:
        check_model("wsimtl_big", allow_untrained=True)
    assert "_" not in str(info.value).split("known models:")[1].split("(")[0]
    listing = CliRunner().invoke(cli, ["models"]).output
    assert "wsimtl-small" in listing and "cerberus-r34" in listing and "wsimtl_small" not in listing and "cerberus_r34" not in listing
    rows = [json.loads(line) for line in CliRunner().invoke(cli, ["models", "--json"]).output.splitlines()]
    assert {r["name"] for r in rows} == {"wsimtl-small", "cerberus-r34"}


@pytest.mark.parametrize(("verbose", "third_party"), [(2, False), (3, True)])
def test_debug_log_is_ours_unless_asked(verbose: int, third_party: bool) -> None:
    code = (f"from wsi_mtl.cli import _configure_logging\n_configure_logging({verbose})\n"
            "import logging, numcodecs.zstd\nlogging.getLogger('wsi_mtl.check').debug('ours')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "DEBUG wsi_mtl.check: ours" in err
    assert ("Registering codec" in err) == third_party, err


def test_deprecated_spellings_warn_and_still_work(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("bogus: 1\n")
    result = CliRunner().invoke(cli, ["train", str(config), "--no-progress"])
    assert "--progress/--no-progress is deprecated; use -q/--quiet" in result.output
    assert "bogus" in str(result.exception) or "bogus" in result.output  # went on to read the config


def test_evaluate_without_a_split_says_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import wsi_mtl.cli.evaluate as evaluate_cli

    monkeypatch.setattr(evaluate_cli, "_REPO_CONFIG", tmp_path / "absent.yaml")  # as installed from a wheel
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["evaluate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config" in err and "--tiles" in err


def test_evaluate_task_values_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--task", "nuclei,lumen"])
    assert info.value.code == 2 and "nuclei_type" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # the old spelling warns and reaches the same check
        main(["evaluate", "--tasks", "lumen"])
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and err[0] == "wsimtl: warning: --tasks is deprecated; use --task" and "'lumen'" in err[1]
