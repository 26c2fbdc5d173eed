"""User-facing errors: one line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import os
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
        # Under `dvc repro`/`dvc exp run`, DVC deletes a stage's outputs before running it;
        # say how to get them back (cached outputs from the DVC cache, the others from git).
        hint = "; `dvc checkout` restores the outputs DVC removed" if os.environ.get("DVC_STAGE") else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
