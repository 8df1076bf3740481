"""The main job, reference/reproduce_paper.py, run on its smoke preset.

The data is a synthetic Fashion-MNIST (idx.gz files written here: 10 classes, each a fixed
blocky 28x28 pattern plus noise), so the tests need neither the Debian package nor a network.
One full run is shared by the consistency tests; an interrupted-then-resumed run must end with
exactly the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "reference" / "reproduce_paper.py"
sys.path.insert(0, str(ROOT / "reference"))

from data import read_idx, write_idx  # noqa: E402

TABLES = [str(i) for i in range(3, 15)]
FIGURES = ["fig1_lr_momentum.png", "fig2_test_accuracy.png", "fig3_regimes.png",
           "grad_norms.png", "corrections.png"]  # fmt: skip
METHODS = ["baseline", "1cycle", "physics", "ikfad", "cd", "adam", "hybrid-mid", "hybrid-epoch"]
SMOKE_EPOCHS = 3
TIMING_WORDS = ("seconds", "saving", "wall")  # measured, so not reproducible run to run


def write_synthetic_fashion_mnist(directory: Path, n_train=1024, n_test=512, seed=0) -> None:
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(10, 7, 7))

    def draw(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        base = np.kron(prototypes[labels], np.ones((1, 4, 4)))
        noise = rng.normal(0, 90, size=(n, 28, 28))
        return np.clip(base + noise, 0, 255).astype(np.uint8), labels

    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = draw(n)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def reproduce(*args, check=True):
    """Run the script in a fresh process (single-threaded: deterministic and fast when shared)."""
    command = [sys.executable, str(SCRIPT), "--preset", "smoke", "--threads", "1",
               "--no-progress", "--no-download", *map(str, args)]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fashion-mnist")
    write_synthetic_fashion_mnist(directory)
    return directory


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("smoke")
    process = reproduce("--data-dir", data_dir, "--out", out)
    results = json.loads((out / "results.json").read_text())
    return out, results, (out / "report.md").read_text(), process.stdout


# -- files ---------------------------------------------------------------------------------------


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_every_table_figure_and_log_is_written(smoke_run):
    out, results, report, _ = smoke_run
    for table in TABLES:
        assert f"## Table {table}:" in report
    assert [t["id"] for t in results["tables"]] == TABLES
    for name in FIGURES:
        png = out / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}" in report
    for method in METHODS:
        lines = (out / "logs" / "seed42" / f"{method}.csv").read_text().splitlines()
        assert len(lines) == 1 + SMOKE_EPOCHS
        assert (out / "checkpoints" / "seed42" / f"{method}.pt").stat().st_size > 0
    # written through a temporary file, but readable like any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.md", "results.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(out.glob("*.tmp"))


# -- the numbers agree with each other ----------------------------------------------------------


def test_corrections_fixed_minus_new_is_net(smoke_run):
    _, results, _, _ = smoke_run
    seed = results["per_seed"]["42"]
    test_size = seed["test_size"]
    for key, c in seed["experiment_3"]["corrections"].items():
        assert c["fixed"] - c["new"] == c["net"], key
        assert c["errors_before"] - c["errors_after"] == c["net"], key
        assert c["accuracy_after"] == pytest.approx(1 - c["errors_after"] / test_size), key
    assert seed["experiment_3"]["corrections"]["A"] == seed["experiment_2"]["correction"]


def test_errors_are_test_size_minus_correct(smoke_run):
    _, results, _, _ = smoke_run
    seed = results["per_seed"]["42"]
    test_size = seed["test_size"]
    assert test_size == 256
    for name, summary in seed["experiment_3"]["trainings"].items():
        assert summary["errors"] == test_size - summary["correct"], name
        assert summary["final_accuracy"] == pytest.approx(summary["correct"] / test_size), name
    errors = seed["experiment_2"]["errors"]["errors"]
    assert errors["baseline"] == seed["experiment_3"]["trainings"]["baseline"]["errors"]
    assert seed["experiment_2"]["localization"]["num_errors"] == errors["baseline"]


def test_regime_counts_sum_to_epochs(smoke_run):
    _, results, _, _ = smoke_run
    methods = results["per_seed"]["42"]["experiment_1"]["methods"]
    for name in ("baseline", "1cycle", "physics"):
        assert sum(methods[name]["regimes"].values()) == SMOKE_EPOCHS, name
    # lr 0.1 -> mu_c = 0.368: mu = 0.9 is underdamped in the first epoch
    assert methods["baseline"]["regime_per_epoch"][0] == "underdamped"
    assert methods["baseline"]["mu"] == [0.9] * SMOKE_EPOCHS
    assert methods["physics"]["mu"][0] == 0.5  # clamp(1 - 2 sqrt(0.1)) = 0.5
    # 1cycle: 0.85 at the peak lr, rising linearly to 0.95 as the lr falls to lr_min = 1e-4
    lrs = methods["1cycle"]["lr"]
    assert lrs == methods["baseline"]["lr"] == methods["physics"]["lr"]
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(1e-4 + (0.1 - 1e-4) * 0.25)  # cos(2pi/3)
    assert methods["1cycle"]["mu"] == pytest.approx(
        [0.95 - 0.10 * (lr - 1e-4) / (0.1 - 1e-4) for lr in lrs]
    )
    assert methods["physics"]["mu"] == pytest.approx(
        [min(max(1 - 2 * lr**0.5, 0.5), 0.99) for lr in lrs]
    )


def test_report_shows_the_numbers_in_results_json(smoke_run):
    _, results, report, stdout = smoke_run
    from report import format_cell, format_paper

    for table in results["tables"]:
        section = report.split(f"## Table {table['id']}:")[1].split("## ")[0]
        for row in table["rows"]:
            line = next(x for x in section.splitlines() if x.startswith(f"| {row['label']} |"))
            cells = [c.strip() for c in line.strip("|").split("|")][1:]
            for i, column in enumerate(table["columns"]):
                assert cells[2 * i + 1] == format_cell(row["values"][i], column["format"])
                assert cells[2 * i] == format_paper(row["paper"][i], column)
    for claim in results["claims"]:
        assert claim["claim"] in report
        verdict = "held" if claim["held"] else "**not held**"
        assert f"| {claim['claim']} | {verdict} |" in report
    held = sum(c["held"] for c in results["claims"])
    assert f"claims held: {held}/{len(results['claims'])}" in stdout


def test_tables_hold_the_per_seed_results(smoke_run):
    _, results, _, _ = smoke_run
    seed = results["per_seed"]["42"]
    tables = {t["id"]: t for t in results["tables"]}
    baseline = seed["experiment_1"]["methods"]["baseline"]
    assert tables["3"]["rows"][0]["values"][0] == [baseline["best_accuracy"]]
    assert [r["values"][0][0] for r in tables["6"]["rows"]] == [
        seed["experiment_1"]["methods"][m]["regimes"]["underdamped"]
        for m in ("baseline", "1cycle", "physics")
    ]
    flagged = [r["label"] for r in tables["8"]["rows"] if r["values"][1] == ["Problem"]]
    assert sorted(flagged) == sorted(seed["experiment_2"]["localization"]["problem_layers"])
    net = next(r for r in tables["13"]["rows"] if r["label"] == "Net improvement")
    assert [v[0]["signed"] for v in net["values"]] == [
        seed["experiment_3"]["corrections"][k]["net"] for k in "ABCDE"
    ]


# -- resume --------------------------------------------------------------------------------------


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if not any(word in k for word in TIMING_WORDS)}  # fmt: skip
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_interrupted_then_resumed_run_gives_the_same_results(smoke_run, data_dir, tmp_path):
    _, uninterrupted, _, _ = smoke_run
    # 3 epochs each for baseline, 1cycle, physics, then 1 of cd's (the fourth and fifth
    # trainings): the interruption falls inside a training, after the first correction.
    stopped = reproduce("--data-dir", data_dir, "--out", tmp_path, "--stop-after-epochs", 10,
                        check=False)  # fmt: skip
    assert stopped.returncode == 3, stopped.stderr
    assert "--resume" in stopped.stderr
    assert not (tmp_path / "results.json").exists()
    reproduce("--data-dir", data_dir, "--out", tmp_path, "--resume")
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert _without_timings(resumed["per_seed"]) == _without_timings(uninterrupted["per_seed"])


# -- errors: one clear line, non-zero exit -------------------------------------------------------


def test_unknown_preset(tmp_path, data_dir):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "huge", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown preset 'huge': choose one of quick, smoke, paper"
    )


def test_missing_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = reproduce("--data-dir", empty, "--out", tmp_path / "out", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: Fashion-MNIST not found")
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "--data-dir" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory_as_user(tmp_path, data_dir):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = reproduce("--data-dir", data_dir, "--out", locked / "run", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: cannot write to output directory {locked}")


def test_output_path_that_is_a_file(tmp_path, data_dir):
    # Works as root too: nothing can be created under a regular file.
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = reproduce("--data-dir", data_dir, "--out", blocker / "run", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: cannot write to output directory {blocker / 'run'}: Not a directory"]


def test_resume_refuses_a_run_of_another_preset(tmp_path, data_dir):
    (tmp_path / "run.json").write_text(json.dumps({"preset": "quick", "seeds": [42]}))
    result = reproduce("--data-dir", data_dir, "--out", tmp_path, "--resume", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --resume: {tmp_path} holds a 'quick' run, not 'smoke'; pass the same "
        "--preset or another --out"
    )
