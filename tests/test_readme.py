"""Every Python example in the README runs as written."""

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


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, capsys):
    if "import transformers" in EXAMPLES[index]:  # the Surgical LoRA example: the [llm] extra
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out  # each example prints what it shows
