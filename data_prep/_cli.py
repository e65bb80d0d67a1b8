"""Shared bits of the data_prep scripts: one-line errors instead of tracebacks for bad input."""

import os
import sys

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(main) -> None:
    """Call main(); a user error (missing dir, empty input, bad option) exits 2 with one line."""
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
