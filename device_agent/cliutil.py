"""What every EdgeWard command line shares: JSON-or-text output and the one error boundary."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from device_agent.errors import EdgeWardError


def emit(args: argparse.Namespace, doc: Any, text: Callable[[Any], str]) -> None:
    """Print ``doc`` as JSON with ``--json``, else as the human-readable ``text(doc)``."""
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(text(doc))


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prog: str,
    before: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse, dispatch to ``args.func`` (after ``before``, if given) and turn every failure into
    one stderr line and its documented exit code (argparse itself exits 2 on usage errors)."""
    args = parser.parse_args(argv)
    try:
        if before is not None:
            before(args)
        return int(args.func(args))
    except EdgeWardError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # last resort: one line, internal error code, never a traceback
        print(f"{prog}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 70
