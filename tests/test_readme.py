"""Every Python example in the README runs as written."""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_an_example_per_optimizer_and_for_the_pipeline():
    code = "\n".join(EXAMPLES)
    for name in ("PhysicsSGD", "iKFAD", "CubicDampedSGD", "CADAM", "localize", "split_halves",
                 "treat_controls"):
        assert name in code


# Examples for frameworks that are not dependencies (the dev extra installs them) skip cleanly
# where one is missing.
OPTIONAL = ("transformers", "peft", "timm", "lightning", "accelerate")


def _missing_optional(code: str) -> list:
    imported = set(re.findall(r"^(?:from|import) (\w+)", code, re.M))
    return [name for name in OPTIONAL if name in imported and not importlib.util.find_spec(name)]


def test_readme_has_framework_examples():
    code = "\n".join(EXAMPLES)
    for name in ("shift_labels=True", 'depth="auto"', "integrations.huggingface",
                 "integrations.lightning"):
        assert name in code


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, capsys):
    missing = _missing_optional(EXAMPLES[index])
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out  # each example prints what it shows
