"""Command line: `aircupy generate | chat | serve | inspect`.

Each command parses its options here and hands off to the package; errors caused by input
(AircupyError) become one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import functools
import sys

import click

from aircupy import __version__
from aircupy.errors import AircupyError


def _one_line_errors(fn):
    """Turn input errors into `error: ...` on stderr with exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AircupyError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except FileNotFoundError as e:
            click.echo(f"error: no such file: {e.filename or e}", err=True)
            sys.exit(2)
        except (IsADirectoryError, PermissionError) as e:
            click.echo(f"error: cannot read {e.filename or e}: {e.strerror}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="aircupy")
def main():
    """aircupy: run GGUF language models larger than VRAM by streaming layers to the GPU."""


# Commands are added below by their owners: inspect (gguf), generate/chat (engine), serve (server).
