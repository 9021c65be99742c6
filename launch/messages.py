"""How the command-line tools report a usage error: one line on stderr, exit status 2."""

from __future__ import annotations

import sys


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
