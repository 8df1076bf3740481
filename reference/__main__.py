"""``python -m dampopt.reference`` and the console script ``dampopt-reproduce``: the paper's
experiments, as ``python reference/reproduce_paper.py`` (the same options).
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import MissingExtra


def main(argv=None) -> int:
    if Path(sys.argv[0]).name == "__main__.py":  # argparse names the program after it
        sys.argv[0] = "python -m dampopt.reference"
    try:
        from .reproduce_paper import main as reproduce
    except MissingExtra as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return reproduce(argv)


if __name__ == "__main__":
    sys.exit(main())
