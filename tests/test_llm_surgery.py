"""reference/llm_surgery.py: the Tier 1-2 experiment's smoke preset end to end, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "reference" / "llm_surgery.py"
LICENSES = Path("/usr/share/common-licenses")

# smoke: 4 blocks of width 32, rank 4; LoRA adds r * (in + out) per Conv1D of a block
PER_BLOCK = 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))


@pytest.mark.skipif(not LICENSES.is_dir(), reason="needs Debian's base-files licence texts")
def test_smoke_preset_runs_and_reports_both_tiers(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # (timing: the preset's docstring)
    results = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "report.md").read_text()
    assert "## Tier 1" in report and "## Tier 2" in report and report in done.stdout

    setup, t1, t2 = results["setup"], results["tier1"], results["tier2"]
    blocks = [f"transformer.h.{i}" for i in range(setup["layers"])]
    predicted = setup["context"] - 1  # shift_labels: the first character is never predicted
    failures = t1["failures"]
    assert failures["num_units"] == setup["localize_windows"] * predicted
    assert 0 < failures["num_failures"] < failures["num_units"]
    assert list(failures["specificity"]) == blocks
    # the flagged block is the most specific one, and the LoRA targets are its projections
    top = max(blocks, key=failures["specificity"].get)
    assert t1["flagged"] == t2["flagged"] == [top]
    assert setup["targets"] == sorted(
        f"{top}.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    # the random-failure control has as many failures, at the same rate
    assert t1["random_control_draws"]["draws"] == setup["control_draws"]
    control = t1["random_failures_control"]
    assert abs(control["num_failures"] - failures["num_failures"]) < 0.1 * failures["num_failures"]

    assert t2["failure_eval_units"] == t2["general_eval_units"] == setup["eval_windows"] * predicted
    arms = {run["arm"]: run for run in t2["runs"]}
    assert len(t2["runs"]) == 4 * len(setup["seeds"]) and set(arms) == {
        "surgical", "full", "random-block", "full-low-rank"
    }  # fmt: skip
    assert arms["surgical"]["trainable_parameters"] == PER_BLOCK
    assert arms["random-block"]["trainable_parameters"] == PER_BLOCK
    assert arms["full"]["trainable_parameters"] == PER_BLOCK * setup["layers"]
    # every block at rank 1 (4 * 1 / 4): the surgical arm's parameter count, spread out
    assert arms["full-low-rank"]["rank"] == t2["low_rank"] == 1
    assert arms["full-low-rank"]["trainable_parameters"] == PER_BLOCK // 4 * setup["layers"]
    assert arms["random-block"]["blocks"] != arms["surgical"]["blocks"]
    for run in t2["runs"]:
        assert run["net"] == run["fixed"] - run["new"] and run["wall_time_s"] > 0
        assert run["steps"] == arms["surgical"]["steps"]  # the same budget in every arm
        assert run["general_perplexity"] > 1
    assert set(t2["hypotheses"]) >= {"fewer_trainable_parameters", "perplexity_rise"}
    assert t2["hypotheses"]["fewer_trainable_parameters"] is True
