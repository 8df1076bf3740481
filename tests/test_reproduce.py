"""The main job, reference/reproduce_paper.py, run on its smoke preset.

The data is a synthetic Fashion-MNIST (idx.gz files written here: 10 classes, each a fixed
blocky 28x28 pattern plus noise), so the tests need neither the Debian package nor a network.
One full run is shared by the consistency tests; an interrupted-then-resumed run must end with
exactly the same numbers.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dampopt.reference.data import (
    AUGMENT_STREAM,
    FASHION_MNIST_CLASSES,
    ORDER_STREAM,
    TensorLoader,
    epoch_seed,
    read_idx,
    write_idx,
)
from dampopt.reference.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "reference" / "reproduce_paper.py"

TABLES = [*map(str, range(3, 11)), "10b", "10c", *map(str, range(11, 15))]
FIGURES = ["fig1_lr_momentum.png", "fig2_test_accuracy.png", "fig3_regimes.png",
           "grad_norms.png", "corrections.png", "per_class_A.png"]  # fmt: skip
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


# -- batch order --------------------------------------------------------------------------------


def _order(seed, epoch, n=64, batch_size=16, **sharding):
    """The example indices a training loader yields in epoch ``epoch`` of the run ``seed``."""
    loader = TensorLoader(torch.zeros(n, 1, 4, 4), torch.arange(n), batch_size, train=True,
                          seed=seed, crop_padding=1, **sharding)  # fmt: skip
    loader.epoch = epoch
    return tuple(torch.cat([labels for _, labels in loader]).tolist())


def test_batch_order_is_new_for_every_seed_and_epoch():
    orders = {(seed, epoch): _order(seed, epoch) for seed in range(40, 46) for epoch in range(5)}
    # DistributedSampler's seed + epoch made seed 42 epoch 1 the order of seed 43 epoch 0
    assert orders[(42, 1)] != orders[(43, 0)]
    assert len(set(orders.values())) == len(orders)
    # a function of (seed, epoch) alone, as --resume needs: a fresh loader repeats it
    assert _order(43, 2) == orders[(43, 2)]
    # the crop and flip generator too: no two (seed, epoch) of small runs share its seed
    for stream in (ORDER_STREAM, AUGMENT_STREAM):
        seeds = {epoch_seed(s, e, stream) for s in range(100) for e in range(300)}
        assert len(seeds) == 100 * 300
        assert all(0 <= x < 2**32 for x in seeds)  # what torch's CPU generator keeps


def test_ranks_shard_the_same_permutation():
    # torchrun: every rank draws one process's permutation and takes every second example
    shards = [_order(42, 1, rank=r, world_size=2) for r in (0, 1)]
    assert [i for pair in zip(*shards) for i in pair] == list(_order(42, 1))


# -- the numbers agree with each other ----------------------------------------------------------


def test_corrections_fixed_minus_new_is_net(smoke_run):
    _, results, _, _ = smoke_run
    seed = results["per_seed"]["42"]
    verify_size = seed["experiment_2"]["verify_size"]  # corrections are verified held out
    assert verify_size + seed["experiment_2"]["localize_size"] == seed["test_size"]
    for key, c in seed["experiment_3"]["corrections"].items():
        assert c["num_examples"] == verify_size, key
        assert c["fixed"] - c["new"] == c["net"], key
        assert c["errors_before"] - c["errors_after"] == c["net"], key
        assert c["accuracy_after"] == pytest.approx(1 - c["errors_after"] / verify_size), key
    assert seed["experiment_3"]["corrections"]["A"] == seed["experiment_2"]["correction"]


def test_control_arms_share_the_budget_and_agree_with_their_comparisons(smoke_run):
    _, results, report, _ = smoke_run
    e2 = results["per_seed"]["42"]["experiment_2"]
    controls = e2["controls"]
    assert controls["flagged"] == e2["correction"]["layers"] == e2["localization"]["problem_layers"]
    assert controls["seeds"] == [0, 1, 2] and controls["num_examples"] == e2["verify_size"]
    arms = controls["arms"]
    assert {"flagged", "random-1", "random-2", "random-3", "all", "largest"} <= set(arms)
    assert {r["steps"] for r in controls["results"]} == {controls["budget"]["steps"]}
    by_arm_seed = {(r["arm"], r["seed"]): r for r in controls["results"]}
    assert len(by_arm_seed) == len(arms) * 3
    for (arm, _), r in by_arm_seed.items():
        assert r["fixed"] - r["new"] == r["net"] and r["layers"] == arms[arm]
    for arm, per_seed in controls["comparisons"].items():
        for seed, comparison in zip(controls["seeds"], per_seed):
            flagged, other = by_arm_seed["flagged", seed], by_arm_seed[arm, seed]
            assert comparison["difference"] == round(
                (flagged["accuracy"] - other["accuracy"]) * e2["verify_size"])
        assert controls["beats"][arm] == all(
            c["difference"] > 0 and c["p_value"] < 0.05 for c in per_seed)
    assert "## Table 10b:" in report and "| random-1 |" in report


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
    # the baseline's errors: those on the localize half plus those on the verify half
    e2 = seed["experiment_2"]
    assert e2["localization"]["num_examples"] == e2["localize_size"]
    halves = e2["localization"]["num_errors"] + e2["correction"]["errors_before"]
    assert halves == errors["baseline"]


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
    from dampopt.reference.report import format_cell, format_paper

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


# -- claims never depend on wall time -------------------------------------------------------------


def _correction_claim(results):
    from dampopt.reference.report import evaluate_claims

    claims = evaluate_claims(results, PRESETS["smoke"])
    return next(c for c in claims if c["id"] == "correction")


def test_correction_claim_is_decided_by_the_counted_saving(smoke_run):
    results = copy.deepcopy(smoke_run[1]["per_seed"]["42"])
    a = results["experiment_3"]["corrections"]["A"]
    a.update(fixed=5, new=3, net=2)  # the claim's other conditions hold

    def verdict(measured, counted):
        a["saving"].update(measured_saving=measured, paper_saving=counted)
        return _correction_claim(results)

    # the two identical smoke runs that measured 75% and 83%: the same verdict
    for counted in (0.7, 0.9):
        slow, fast = verdict(0.75, counted), verdict(0.83, counted)
        assert slow["held"] == fast["held"] == (counted >= 0.8)
        assert "75%" in slow["evidence"] and "83%" in fast["evidence"]  # shown beside it
    assert verdict(0.95, 0.79)["held"] is False
    held = verdict(0.10, 0.80)
    assert held["held"] is True
    assert "80% by the epochs x groups count (this decides)" in held["evidence"]


def _timings_redrawn(value, rng):
    """``value`` with every wall-time number (seconds, measured fractions) drawn at random."""
    if isinstance(value, dict):
        return {k: rng.uniform(-1, 1e4)
                if ("seconds" in k or k.startswith("measured")) and isinstance(v, float)
                else _timings_redrawn(v, rng) for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_timings_redrawn(v, rng) for v in value]
    return value


def test_no_claim_depends_on_a_time(smoke_run):
    from dampopt.reference.report import evaluate_claims

    results = smoke_run[1]["per_seed"]["42"]
    expected = [c["held"] for c in evaluate_claims(results, PRESETS["smoke"])]
    rng = np.random.default_rng(0)
    for _ in range(5):
        redrawn = _timings_redrawn(results, rng)
        assert redrawn != results
        assert [c["held"] for c in evaluate_claims(redrawn, PRESETS["smoke"])] == expected


# -- the environment ----------------------------------------------------------------------------


def test_results_record_the_environment(smoke_run):
    import dampopt

    _, results, _, _ = smoke_run
    environment = results["environment"]
    assert environment["torch"] == torch.__version__
    assert environment["dampopt"] == dampopt.__version__
    assert environment["python"] == platform.python_version()
    assert environment["torch_threads"] == 1  # --threads 1
    assert environment["device"] == results["device"]
    assert environment["world_size"] == 1
    args = environment["args"]
    assert args["preset"] == "smoke" and args["seeds"] == [42] and args["threads"] == 1
    assert args["no_download"] is True and args["resume"] is False
    assert Path(environment["argv"][0]).name == "reproduce_paper.py"
    assert environment["argv"][1:3] == ["--preset", "smoke"]
    in_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True)
    if in_git.returncode == 0:
        assert re.fullmatch(r"[0-9a-f]{40}", environment["git_commit"])
        assert isinstance(environment["git_dirty"], bool)
    else:
        assert environment["git_commit"] is None


def test_the_installed_package_runs_the_same_main(smoke_run, data_dir, tmp_path):
    """``python -m dampopt.reference`` (and ``dampopt-reproduce``) from outside the checkout.

    Cheap: it resumes a copy of the smoke run, whose trainings and corrections are all
    checkpointed, and must give the same results and report as the script did.
    """
    import shutil

    out, results, report, _ = smoke_run
    copy_of_run = tmp_path / "run"
    shutil.copytree(out, copy_of_run)
    command = [sys.executable, "-m", "dampopt.reference", "--preset", "smoke", "--threads", "1",
               "--no-progress", "--no-download", "--data-dir", str(data_dir), "--out",
               str(copy_of_run), "--resume"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONHASHSEED": "0"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads((copy_of_run / "results.json").read_text())
    assert _without_timings(again["per_seed"]) == _without_timings(results["per_seed"])
    assert again["environment"]["argv"][0] == "python -m dampopt.reference"

    def without_wall_time(text):
        return re.sub(r"Wall time: \d+ s", "", text)

    assert without_wall_time((copy_of_run / "report.md").read_text()) == without_wall_time(report)
    script = Path(sys.executable).with_name("dampopt-reproduce")
    unknown = subprocess.run([str(script), "--preset", "huge"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)  # fmt: skip
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "error: unknown preset 'huge': choose one of quick, smoke, paper"
    )


def test_a_missing_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from dampopt.reference.__main__ import main\nsys.exit(main(['--preset', 'smoke']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: matplotlib is not installed; the reference experiments need the 'reference' "
        'extra: pip install "dampopt[reference]"'
    )


def test_git_state_is_none_without_a_repository_or_git(tmp_path, monkeypatch):
    from dampopt.reference.reproduce_paper import git_state

    assert git_state(tmp_path) == (None, None)  # not a repository (tmp is outside any)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to run
    assert git_state(ROOT) == (None, None)


# -- figures over several seeds -----------------------------------------------------------------


def test_mean_and_band():
    from dampopt.reference.figures import mean_and_band

    mean, low, high = mean_and_band([[0.1, 0.5, None], [0.3, 0.9, 0.4], [0.2, 0.4, 0.6]])
    np.testing.assert_allclose(mean, [0.2, 0.6, np.nan])
    np.testing.assert_allclose(low, [0.1, 0.4, np.nan])
    np.testing.assert_allclose(high, [0.3, 0.9, np.nan])
    one = mean_and_band([[0.5, 0.7]])  # one seed: the curve itself, no width
    for curve in one:
        np.testing.assert_allclose(curve, [0.5, 0.7])
    with pytest.raises(ValueError):
        mean_and_band([[0.1, 0.2], [0.3]])


def test_per_class_accuracy():
    from dampopt.reference.experiments import per_class_accuracy

    labels = torch.tensor([0, 0, 1, 1, 1, 3])
    predictions = torch.tensor([0, 1, 1, 1, 0, 3])
    assert per_class_accuracy(predictions, labels, 4) == pytest.approx([0.5, 2 / 3, None, 1.0])


def test_per_class_accuracy_of_correction_a(smoke_run):
    _, results, _, _ = smoke_run
    a = results["per_seed"]["42"]["experiment_3"]["corrections"]["A"]
    assert len(a["per_class_before"]) == len(a["per_class_after"]) == 10
    assert results["classes"] == list(FASHION_MNIST_CLASSES)
    for accuracy in a["per_class_before"] + a["per_class_after"]:
        assert accuracy is None or 0 <= accuracy <= 1
    assert a["per_class_before"] != a["per_class_after"] or a["fixed"] == a["new"] == 0


def test_figures_of_two_seeds_show_both(smoke_run, tmp_path, monkeypatch):
    from dampopt.reference import figures

    first = smoke_run[1]["per_seed"]["42"]
    second = copy.deepcopy(first)
    for methods in (second["experiment_1"]["methods"], second["experiment_3"]["trainings"],
                    second["experiment_4"]["methods"]):  # fmt: skip
        for method in methods.values():
            method["test_accuracy"] = [a - 0.1 for a in method["test_accuracy"]]
    a = second["experiment_3"]["corrections"]["A"]
    a["per_class_after"] = [None if v is None else v / 2 for v in a["per_class_after"]]
    seen, original = [], figures.mean_and_band

    def recording(curves):
        seen.append([list(curve) for curve in curves])
        return original(curves)

    monkeypatch.setattr(figures, "mean_and_band", recording)
    captions = figures.write_figures({42: first, 43: second}, PRESETS["smoke"], tmp_path,
                                     classes=FASHION_MNIST_CLASSES)  # fmt: skip
    assert sorted(captions) == sorted(FIGURES)
    for name in FIGURES:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(seeds 42, 43)" in captions["fig2_test_accuracy.png"]
    assert "(seed 42)" in captions["grad_norms.png"]
    # the baseline's accuracy curve and correction A's per-class bars: a band over both seeds
    baseline = first["experiment_3"]["trainings"]["baseline"]["test_accuracy"]
    assert [baseline, [x - 0.1 for x in baseline]] in seen
    assert [first["experiment_3"]["corrections"]["A"]["per_class_after"],
            a["per_class_after"]] in seen  # fmt: skip


def test_figures_of_one_seed_say_so(smoke_run):
    out, results, report, _ = smoke_run
    for caption in results["figures"].values():
        assert caption.endswith("(seed 42)")
    assert "Each caption says which seeds it shows." in report


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


def test_prepared_images_have_plain_nchw_strides(tmp_path):
    # A permuted NHWC array has channels-last strides even when is_contiguous() says True (one
    # channel); torch 2.14's CPU conv backward then corrupted the heap on odd batch sizes.
    write_synthetic_fashion_mnist(tmp_path, n_train=64, n_test=32)
    from dampopt.reference.data import load_fashion_mnist, prepare

    data = prepare(load_fashion_mnist(str(tmp_path), download=False), torch.device("cpu"),
                   48, 24, 14, seed=0)  # fmt: skip
    for images in (data.train_images, data.test_images):
        n, c, h, w = images.shape
        assert images.stride() == (c * h * w, h * w, w, 1)


# -- damaged files, full disks, a resume of nothing ---------------------------------------------


def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path):
    from dampopt.reference import files

    path = tmp_path / "baseline.pt"
    files.save({"model": {"w": torch.ones(3)}}, path)
    path.write_bytes(path.read_bytes()[:40])  # truncated, as by a crash or a full disk
    with pytest.raises(files.FileProblem, match=r"baseline.pt is damaged .*delete it.*--resume"):
        files.load(path)


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import errno

    from dampopt.reference import files

    path = tmp_path / "cache.pt"
    files.save({"result": 1}, path)

    def full(obj, target):
        Path(target).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.torch, "save", full)
    with pytest.raises(files.FileProblem, match=r"no space left on device while writing .*cache"):
        files.save({"result": 2}, path)
    monkeypatch.undo()
    assert files.load(path) == {"result": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]


def test_damaged_or_mismatched_data_files_are_clear_errors(tmp_path):
    write_synthetic_fashion_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    good = labels.read_bytes()
    labels.write_bytes(good[: len(good) // 2])  # a truncated gzip file
    done = subprocess.run(
        [sys.executable, str(ROOT / "reference" / "reproduce_paper.py"), "--preset", "smoke",
         "--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "train-labels-idx1-ubyte.gz" in done.stderr and "damaged" in done.stderr
    write_idx(labels, np.zeros(10, dtype=np.uint8))  # readable, but 10 labels for 1024 images
    from dampopt.reference.data import DataUnavailable, load_fashion_mnist

    with pytest.raises(DataUnavailable, match="1024 images but its labels file 10 labels"):
        load_fashion_mnist(str(tmp_path), download=False)


def test_resume_of_a_directory_that_does_not_exist_is_an_error(tmp_path):
    for script in ("reproduce_paper.py", "surgical_benchmark.py"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "reference" / script), "--preset", "smoke", "--resume",
             "--out", str(tmp_path / "nothing-here")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, (script, done.stderr[-500:])
        assert "does not exist; there is no run to continue" in done.stderr
        assert not (tmp_path / "nothing-here").exists()


# A run whose writes fail with ENOSPC from the k-th checkpoint on: as a disk filling up.
_FULL_DISK = """
import errno, sys
from dampopt.reference import files, reproduce_paper
calls = [0]
real = files.torch.save
def save(obj, target):
    calls[0] += 1
    if calls[0] >= {after}:
        raise OSError(errno.ENOSPC, "No space left on device")
    real(obj, target)
files.torch.save = save
sys.exit(reproduce_paper.main(sys.argv[1:]))
"""


def test_a_full_disk_stops_the_run_resumably(smoke_run, data_dir, tmp_path):
    _, uninterrupted, _, _ = smoke_run
    script = _FULL_DISK.format(after=12)
    full = subprocess.run(
        [sys.executable, "-c", script, "--preset", "smoke", "--threads", "1", "--no-progress",
         "--no-download", "--data-dir", str(data_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "no space left on device while writing" in full.stderr and ".pt" in full.stderr
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written temporary left behind
    reproduce("--data-dir", data_dir, "--out", tmp_path, "--resume")  # space freed
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert _without_timings(resumed["per_seed"]) == _without_timings(uninterrupted["per_seed"])


def test_a_run_killed_at_a_random_moment_resumes_to_the_same_results(smoke_run, data_dir,
                                                                      tmp_path):  # fmt: skip
    import random
    import signal
    import time

    _, uninterrupted, _, _ = smoke_run
    command = [sys.executable, str(SCRIPT), "--preset", "smoke", "--threads", "1",
               "--no-progress", "--no-download", "--data-dir", str(data_dir), "--out",
               str(tmp_path)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONHASHSEED": "0"})  # fmt: skip
    time.sleep(random.Random(7).uniform(4, 14))  # somewhere inside the trainings
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    reproduce("--data-dir", data_dir, "--out", tmp_path, "--resume")
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert _without_timings(resumed["per_seed"]) == _without_timings(uninterrupted["per_seed"])
