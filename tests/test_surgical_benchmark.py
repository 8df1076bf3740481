"""The surgical fine-tuning benchmark: shifts, the oracle loop, the scores, and a smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dampopt.reference import shifts
from dampopt.reference import surgical_benchmark as bench
from test_reproduce import write_synthetic_fashion_mnist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent

# -- shifts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [s for s in shifts.all_shifts() if s.kind == "input"],
                         ids=lambda s: s.name)  # fmt: skip
def test_every_corruption_changes_the_images_reproducibly(shift):
    images = torch.rand(16, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    original = images.clone()
    labels = torch.arange(16) % 10
    once, same = shifts.apply(shift, images, labels, seed=3), shifts.apply(shift, images, labels, 3)
    assert not torch.equal(once[0], images) and torch.equal(once[1], labels)
    assert torch.equal(once[0], same[0])  # a function of the seed
    assert once[0].min() >= 0 and once[0].max() <= 1
    assert torch.equal(images, original)  # the input is left alone
    if shift.corruption in ("noise", "impulse"):  # random corruptions: another seed, another draw
        assert not torch.equal(shifts.apply(shift, images, labels, seed=4)[0], once[0])


def test_severity_2_corrupts_more_than_severity_1():
    images = torch.rand(32, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(32, dtype=torch.long)
    for corruption in ("noise", "blur", "contrast", "impulse"):
        change = [
            float((shifts.apply(shifts.Shift("x", "input", corruption, s), images, labels, 0)[0]
                   - images).abs().mean()) for s in (1, 2)
        ]  # fmt: skip
        assert change[1] > change[0] > 0, corruption


def test_the_label_shift_is_a_permutation_of_some_classes():
    labels = torch.arange(10).repeat(3)
    images = torch.rand(30, 1, 4, 4)
    (shift,) = [s for s in shifts.all_shifts() if s.kind == "output"]
    new_images, new_labels = shifts.apply(shift, images, labels, seed=0)
    assert torch.equal(new_images, images)
    mapping = {int(a): int(b) for a, b in zip(labels, new_labels)}
    assert sorted(mapping.values()) == list(range(10))  # a permutation
    assert [c for c in range(10) if mapping[c] != c] == [0, 1, 2, 3]


# -- the oracle and the scores -------------------------------------------------------------------


def test_the_oracle_trains_each_arm_on_exactly_its_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    test = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)

    def train(seed):
        return DataLoader(TensorDataset(x, y), batch_size=bench.TARGET_BATCH, shuffle=True)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    arms = bench.oracle(model, train, test, ["0", "2"], epochs=1, lr=0.05, seed=0)
    assert list(arms) == ["0", "2", "all"]
    assert arms["0"]["trainable_elements"] == 6 * 8 + 8
    assert arms["2"]["trainable_elements"] == 8 * 3 + 3
    assert arms["all"]["trainable_elements"] == 6 * 8 + 8 + 8 * 3 + 3
    assert {a["steps"] for a in arms.values()} == {256 // bench.TARGET_BATCH}  # same budget
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(0 <= a["accuracy"] <= 1 for a in arms.values())


def test_spearman_and_score_on_constructed_rankings():
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert bench.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # average ranks
    assert bench.spearman([1, 1, 1], [1, 2, 3]) is None
    gains = {"a": 0.10, "b": 0.02, "c": -0.01}
    hit = bench.score({"a": 3.0, "b": 2.0, "c": 1.0}, ["a"], gains, cost=10, oracle_cost=100)
    assert hit["top_is_best"] and hit["best_flagged"] and hit["fraction_of_best"] == 1.0
    assert hit["spearman"] == pytest.approx(1.0) and hit["cost_fraction"] == 0.1
    miss = bench.score({"a": 1.0, "b": 3.0, "c": 2.0}, [], gains, cost=50, oracle_cost=100)
    assert miss["top"] == "b" and not miss["top_is_best"] and not miss["best_flagged"]
    assert miss["fraction_of_best"] == pytest.approx(0.2)
    nothing = bench.score({"a": 1.0, "b": 2.0, "c": 3.0}, [], {"a": -0.1, "b": -0.2, "c": -0.3},
                          cost=1, oracle_cost=1)  # fmt: skip
    assert nothing["fraction_of_best"] is None  # no group gains: no fraction to report


def test_summary_counts_the_aim_and_lee_pattern():
    def run(best_input, best_label, tops):
        out = {}
        for name, kind, best in (("noise-1", "input", best_input), ("labels-1", "output",
                                                                    best_label)):  # fmt: skip
            gains = {g: (0.1 if g == best else 0.0) for g in bench.LAYER_GROUPS}
            scores = {n: bench.score({g: float(g == tops[n][kind]) for g in bench.LAYER_GROUPS},
                                     [], gains, cost=1, oracle_cost=100)
                      for n in bench.LOCALIZERS}  # fmt: skip
            out[name] = {"source_accuracy": 0.5, "gains": gains, "all_gain": 0.05,
                         "scores": scores}  # fmt: skip
        return out

    tops = {n: {"input": "conv1", "output": "fc"} for n in bench.LOCALIZERS}
    tops["random"] = {"input": "layer4", "output": "fc"}
    chosen = [s for s in shifts.all_shifts() if s.name in ("noise-1", "labels-1")]
    summary = bench.summarize({42: run("conv1", "fc", tops), 43: run("conv1", "fc", tops)},
                              chosen)  # fmt: skip
    assert summary["lee_pattern"]["held"]
    assert summary["aim"]["grad_norm"]["reached"] and not summary["aim"]["random"]["reached"]
    assert summary["table"]["noise-1"]["localizers"]["random"]["top_is_best"] == 0
    flipped = bench.summarize({42: run("layer4", "conv1", tops)}, chosen)
    assert not flipped["lee_pattern"]["held"]


def test_smoke_run_writes_the_report(tmp_path):
    data = tmp_path / "data"
    write_synthetic_fashion_mnist(data)
    out = tmp_path / "bench"
    command = [sys.executable, str(ROOT / "reference" / "surgical_benchmark.py"), "--preset",
               "smoke", "--seeds", "42", "--out", str(out), "--data-dir", str(data),
               "--no-download", "--no-progress", "--threads", "1"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    table = results["summary"]["table"]
    assert set(table) == set(bench.SMOKE_SHIFTS)
    for name in bench.SMOKE_SHIFTS:
        run = results["per_seed"]["42"][name]
        assert set(run["oracle"]) == {*bench.LAYER_GROUPS, "all"}
        assert set(run["scores"]) == set(bench.LOCALIZERS)
        for score in run["scores"].values():
            assert score["best"] == max(run["gains"], key=run["gains"].get)
        assert (out / "figures" / f"{name}.png").exists()
    assert "Lee et al.'s pattern" in report and "| noise-1 |" in report
    assert "aim" in done.stdout
    # --resume reuses the source model and every finished shift: the same numbers
    for name in bench.SMOKE_SHIFTS:
        assert (out / "checkpoints" / "seed42" / f"shift-{name}.pt").exists()
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["summary"] == results["summary"]
