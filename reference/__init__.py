"""The paper's experiments, installed as ``dampopt.reference`` (the folder ``reference/``).

    python -m dampopt.reference --preset smoke      # or: dampopt-reproduce --preset smoke
    python reference/reproduce_paper.py --preset smoke   # the same, from a checkout

The entry points: :mod:`.reproduce_paper` (the four experiments, tables, figures and claims),
:mod:`.surgical_benchmark`, :mod:`.planted_defect` and :mod:`.throughput`. They need the
``reference`` extra (torchvision, matplotlib, numpy): ``pip install "dampopt[reference]"``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

EXTRA = "reference"
# the third-party modules the reference code imports beyond dampopt's own dependencies
EXTRA_MODULES = ("matplotlib", "numpy", "torchvision")


class MissingExtra(ModuleNotFoundError):
    """A module of the ``reference`` extra is not installed; the message says how to get it."""


@contextlib.contextmanager
def needs_extra():
    """Imports in this block that fail for a module of the extra say which extra to install."""
    try:
        yield
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if top not in EXTRA_MODULES or isinstance(error, MissingExtra):
            raise
        raise MissingExtra(
            f"{top} is not installed; the reference experiments need the {EXTRA!r} extra: "
            f'pip install "dampopt[{EXTRA}]"',
            name=top,
        ) from None


def run_file(path: str) -> None:
    """``python reference/<name>.py``: run the installed ``dampopt.reference.<name>``'s main.

    The scripts import each other as one package, so running one as a file hands over to the
    installed package; it refuses to run another checkout's code than the file's own.
    """
    here = Path(path).resolve()
    installed = Path(__file__).resolve().parent
    if installed != here.parent:
        sys.exit(
            f"error: {here} is not the installed dampopt.reference ({installed}); install this "
            f'checkout (pip install -e ".[{EXTRA}]") or run python -m dampopt.reference'
        )
    try:
        module = importlib.import_module(f"{__name__}.{here.stem}")
    except MissingExtra as error:
        sys.exit(f"error: {error}")
    sys.exit(module.main())
