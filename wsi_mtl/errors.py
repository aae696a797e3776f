"""One small exception hierarchy; the CLI maps each class to a one-line message and an exit code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "WsimtlError",
    "SlideError",
    "UnsupportedSlideError",
    "MissingMppError",
    "NoTissueError",
    "DamagedRegionError",
    "DamagedSlideError",
    "ModelError",
    "OutputError",
    "InputError",
    "WorkerError",
]


class WsimtlError(Exception):
    """Base class of every error a user can cause; ``exit_code`` is what the CLI returns."""

    exit_code: int = 1


class InputError(WsimtlError):
    """A bad argument or input file that is not a slide problem (manifest, config, path)."""

    exit_code = 2


class SlideError(WsimtlError):
    """The slide cannot be opened or read: missing, a directory, empty, truncated, damaged."""

    exit_code = 10


class UnsupportedSlideError(SlideError):
    """No reader understands this file format."""

    exit_code = 11


class MissingMppError(SlideError):
    """The slide carries no usable microns-per-pixel and no override was given."""

    exit_code = 12


class NoTissueError(SlideError):
    """The tissue mask is empty: nothing to send to the network."""

    exit_code = 13


class DamagedRegionError(SlideError):
    """One region of an otherwise readable slide failed to decode (a damaged tile).

    When only parts of the region are damaged, ``image`` holds the region with those parts white
    and ``boxes`` their (x, y, width, height) in the raiser's pixel frame (level px in a reader,
    level-0 px from :meth:`wsi_mtl.slide.Slide.read`), ``reasons`` why each failed; else ``image``
    is None.
    """

    exit_code = 14

    def __init__(self, message: str, *, image: Any = None, boxes: Sequence[tuple[int, int, int, int]] = (),
                 reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.image = image
        self.boxes = list(boxes)
        self.reasons = list(reasons) or [message] * len(self.boxes)


class DamagedSlideError(SlideError):
    """Too much of the slide's tissue is unreadable (see ``wsi_mtl.damage.MAX_DAMAGED_FRACTION``)."""

    exit_code = 15


class ModelError(WsimtlError):
    """The model cannot be found or its weights do not match its architecture."""

    exit_code = 20


class OutputError(WsimtlError):
    """The output folder cannot be written (permissions, full disk)."""

    exit_code = 30


class WorkerError(WsimtlError):
    """A worker process died on a job it ran alone (killed by the system, most often for lack of
    memory): the job cannot be done here as asked."""

    exit_code = 40
