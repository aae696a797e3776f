"""The ``wsimtl`` command line: a thin click layer over the library.

Each subcommand lives in its own module and is imported only when it runs, so ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ..errors import WsimtlError

__all__ = ["main", "cli"]

_COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("wsi_mtl.cli.info", "info"),
    "segment": ("wsi_mtl.cli.segment", "segment"),
    "export": ("wsi_mtl.cli.export", "export"),
    "train": ("wsi_mtl.cli.train", "train"),
    "evaluate": ("wsi_mtl.cli.evaluate", "evaluate"),
    "batch": ("wsi_mtl.cli.batch", "batch"),
    "models": ("wsi_mtl.cli.models", "models"),
    "embed": ("wsi_mtl.cli.embed", "embed"),
    "probe": ("wsi_mtl.cli.probe", "probe"),
}


class _LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (mod, _) in _COMMANDS.items() if importlib.util.find_spec(mod))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module = importlib.import_module(target[0])
        return getattr(module, target[1])


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "WSIMTL"})
@click.version_option(package_name="wsimtl")
@click.option("-v", "--verbose", count=True, help="More log output: -v info, -vv debug (wsimtl's own), -vvv debug of every library too.")
def cli(verbose: int) -> None:
    """Multi-task whole-slide analysis of H&E slides: nuclei, glands, lumen and tissue."""
    _configure_logging(verbose)


def _configure_logging(verbose: int) -> None:
    """wsimtl's loggers follow ``-v``; other libraries' (numcodecs, dask, ...) stay at warnings below ``-vvv``."""
    ours = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=logging.DEBUG if verbose >= 3 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wsi_mtl").setLevel(ours)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``wsimtl`` console script: user errors become one line and an exit code."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except WsimtlError as exc:
        click.echo(f"wsimtl: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("wsimtl: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("wsimtl: interrupted; run the same command again to continue", err=True)
        sys.exit(130)
    except OSError as exc:
        import errno

        if exc.errno == errno.ENOSPC:
            click.echo(f"wsimtl: error: disk full while writing {exc.filename or 'output'}; free space and run the same command again to continue", err=True)
            sys.exit(30)
        raise
