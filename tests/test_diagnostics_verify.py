"""Verify (counts, exact McNemar), compute saving, and the comparisons (Tables 7 and 12)."""

import json

import pytest
import torch

from dampopt.diagnostics import (
    compare_errors,
    compare_layers,
    compute_saving,
    mcnemar_exact,
    predict,
    verify,
)


def _case(fixed, new, both_right=0, both_wrong=0):
    """Labels all 0; 'right' predicts 0, 'wrong' predicts 1."""
    before = [1] * fixed + [0] * new + [0] * both_right + [1] * both_wrong
    after = [0] * fixed + [1] * new + [0] * both_right + [1] * both_wrong
    return [0] * len(before), before, after


def test_verify_counts_on_a_constructed_case():
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    before = [0, 1, 0, 0, 1, 1, 2, 0]  # wrong at 2, 3, 4, 7
    after = [0, 2, 2, 3, 1, 1, 1, 0]  # wrong at 1, 4, 6, 7
    result = verify(labels, before, after)
    assert (result.fixed, result.new, result.net) == (2, 2, 0)
    assert result.fixed_indices == [2, 3] and result.new_indices == [1, 6]
    assert (result.errors_before, result.errors_after) == (4, 4)
    assert result.accuracy_before == result.accuracy_after == 0.5
    assert result.p_value == 1.0
    assert "| Net improvement | — | +0 |" in result.to_markdown()
    json.dumps(result.to_dict(), allow_nan=False)


def test_papers_62_fixed_40_new_gives_p_0037():
    result = verify(*_case(62, 40, both_right=9000, both_wrong=400))
    assert (result.fixed, result.new, result.net) == (62, 40, 22)
    assert round(result.p_value, 3) == 0.037
    assert result.errors_before == 462 and result.errors_after == 440


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(7, 7) == 1.0  # symmetric: no evidence either way
    assert mcnemar_exact(5, 0) == 2 / 32  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(1, 5) == 2 * 7 / 64
    assert mcnemar_exact(62, 40) == mcnemar_exact(40, 62)
    with pytest.raises(ValueError, match="fixed"):
        mcnemar_exact(-1, 3)


def test_mcnemar_exact_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for fixed, new in [(62, 40), (55, 49), (146, 148), (3, 11), (42, 59)]:
        expected = stats.binomtest(fixed, fixed + new, 0.5).pvalue
        assert mcnemar_exact(fixed, new) == pytest.approx(expected, rel=1e-12)


def test_verify_rejects_bad_input():
    with pytest.raises(ValueError, match="preds_after has 2 entries"):
        verify([0, 1, 2], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="labels must hold class indices >= 0"):
        verify([0, -1], [0, 1], [0, 1])
    with pytest.raises(ValueError, match=r"preds_before must be in \[0, 3\)"):
        verify([0, 1], [0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="integer class indices"):
        verify([0.5, 1.0], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        verify([], [], [])


def test_predict_returns_labels_and_argmax_in_loader_order():
    x = torch.eye(4)[[2, 0, 3, 1, 1]]
    y = torch.tensor([2, 1, 3, 1, 0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    model = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    labels, preds = predict(model, loader)
    assert labels.tolist() == [2, 1, 3, 1, 0] and preds.tolist() == [2, 0, 3, 1, 1]
    assert verify(labels, preds, labels).fixed == 2


def test_compute_saving_keeps_measured_and_paper_figures_apart():
    measured = compute_saving(120.0, 1000.0)
    assert measured.measured_fraction == 0.12 and measured.measured_saving == 0.88
    assert measured.paper_fraction is None
    paper = compute_saving(
        correction_epochs=30, training_epochs=200, groups_trained=3, total_groups=7
    )
    assert paper.paper_fraction == 90 / 1400 and paper.measured_fraction is None
    assert "paper's epochs x groups figure (not measured)" in paper.to_markdown()
    with pytest.raises(ValueError, match="training_seconds"):
        compute_saving(1.0, 0.0)
    with pytest.raises(ValueError, match="total_groups"):
        compute_saving(correction_epochs=30, training_epochs=200, groups_trained=3)


def test_compare_layers_on_the_papers_table_12():
    sgd = ["layer3", "conv1", "layer2"]
    ikfad = compare_layers(sgd, ["bn1", "layer3", "layer2"])
    assert ikfad.intersection == ["layer3", "layer2"]
    assert ikfad.union == ["layer3", "conv1", "layer2", "bn1"]
    assert (ikfad.only_a, ikfad.only_b, ikfad.jaccard) == (["conv1"], ["bn1"], 0.5)
    adam = compare_layers(sgd, ["conv1", "layer2", "layer3"])
    assert adam.jaccard == 1.0 and adam.only_a == adam.only_b == []
    assert compare_layers([], []).jaccard == 1.0
    with pytest.raises(TypeError):
        compare_layers("layer3", ["layer3"])


def test_compare_errors_table_7_categories():
    labels = [0] * 10
    #            0  1  2  3  4  5  6  7  8  9
    baseline = [1, 1, 1, 0, 0, 0, 0, 1, 0, 0]
    physics = [1, 1, 0, 1, 1, 0, 0, 0, 0, 0]
    onecycle = [1, 0, 0, 0, 0, 1, 0, 1, 0, 0]
    result = compare_errors({"baseline": baseline, "physics": physics, "1cycle": onecycle}, labels)
    assert result.errors == {"baseline": 4, "physics": 4, "1cycle": 3}
    assert result.common_errors == 1  # example 0
    assert result.only_wrong == {"baseline": 1, "physics": 2, "1cycle": 1}  # 2; 3, 4; 5
    assert result.all_correct == 3  # 6, 8, 9
    pairs = {(r["correct"], r["wrong"]): r["count"] for r in result.correct_wrong}
    assert pairs[("physics", "baseline")] == 2  # 2, 7
    assert pairs[("baseline", "physics")] == 2  # 3, 4
    assert len(pairs) == 6
    assert "| Physics correct" not in result.to_markdown()
    assert "| physics correct, baseline wrong | 2 |" in result.to_markdown()
    with pytest.raises(ValueError, match="at least two"):
        compare_errors({"a": baseline}, labels)


def test_every_result_serializes_to_json_and_markdown():
    from dampopt.diagnostics import cosine_schedule, scan_schedule

    results = [
        scan_schedule(cosine_schedule(0.1, 1e-4, 5), 0.9),
        compute_saving(1.0, 10.0, correction_epochs=1, training_epochs=10, groups_trained=1,
                       total_groups=2),
        compare_layers(["a"], ["a", "b"]),
        compare_errors({"x": [0, 1], "y": [1, 1]}, [0, 0]),
        verify([0, 1], [0, 0], [0, 1]),
    ]  # fmt: skip
    for result in results:
        data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
        assert isinstance(data, dict) and data
        assert result.to_markdown().startswith("| ")
    assert json.loads(json.dumps(results[0].to_dict()))["rows"][0]["regime"] == "underdamped"
