"""User-facing errors: one line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad params, missing data, a bad file). The message says
    what is wrong and how to fix it, on one line."""


EXIT_USER_ERROR = 2


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage's `main()`, turning a `UserError` into one line and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
