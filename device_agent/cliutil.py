"""What every EdgeWard command line shares: JSON-or-text output and the one error boundary."""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from device_agent import __version__
from device_agent.errors import EdgeWardError, EnvironmentFault

# Which extra of the ``edgeward`` distribution brings each optional top-level module
# (pyproject.toml). A board installs only ``device``; the host commands need ``host``.
EXTRA_OF_MODULE = {
    "numpy": "device",
    "onnxruntime": "device",
    "nacl": "device",
    "cryptography": "device",
    "paho": "device",
    "onnx": "host",
    "tqdm": "host",
    "ai_edge_quantizer": "host",
    "packager": "host",
    "fleet": "host",
    "ai_edge_litert": "tflite",
    "art": "redteam",
    "sklearn": "redteam",
}


class Parser(argparse.ArgumentParser):
    """argparse with the contract's error form: a usage error is one line on stderr naming what
    was wrong and where the help is, exit 2 (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def add_version(parser: argparse.ArgumentParser) -> None:
    """``PROG --version``: the installed EdgeWard release."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def missing_module(e: ModuleNotFoundError) -> EnvironmentFault:
    """A dependency this install lacks, as the environment fault it is, naming the extra to add."""
    top = (e.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return EnvironmentFault(f"this command needs the Python module {top or e}, which is not installed")
    return EnvironmentFault(
        f"this command needs the Python module {top}, which this install lacks: "
        f"install the '{extra}' extra (pip install 'edgeward[{extra}]')"
    )


def emit(args: argparse.Namespace, doc: Any, text: Callable[[Any], str]) -> None:
    """Print ``doc`` as JSON with ``--json``, else as the human-readable ``text(doc)``."""
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(text(doc))


def _stdout_closed() -> bool:
    """Whether our stdout is a pipe whose reader has gone (poll reports an error on it), as
    opposed to some other pipe or socket of the command breaking."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_closed_stdout() -> None:
    """The reader of our output went away (``edgeward profiles | head -1``): nothing more can be
    said to it, so later writes (and the flush at exit) go nowhere instead of raising."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prog: str,
    before: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse, dispatch to ``args.func`` (after ``before``, if given) and turn every failure into
    one stderr line and its documented exit code (argparse itself exits 2 on usage errors).
    A closed stdout pipe ends the command quietly."""
    args = parser.parse_args(argv)
    try:
        if before is not None:
            before(args)
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError as e:
        if not _stdout_closed():
            print(f"{prog}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            return 70
        _quiet_closed_stdout()
        return 0
    except ModuleNotFoundError as e:
        err = missing_module(e)
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    except EdgeWardError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # last resort: one line, internal error code, never a traceback
        print(f"{prog}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 70
