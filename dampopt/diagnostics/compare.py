"""Comparisons across diagnoses and models: layer overlap (Table 12) and error sets (Table 7)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

from ._report import Report, markdown_table
from .verify import check_predictions


@dataclass
class LayerComparison(Report):
    a: list
    b: list
    intersection: list
    union: list
    only_a: list
    only_b: list
    jaccard: float  # |a & b| / |a | b|; 1.0 when both are empty (they agree)

    def to_markdown(self) -> str:
        return markdown_table(
            ["Set", "Layers", "Count"],
            [
                ("a", ", ".join(self.a), len(self.a)),
                ("b", ", ".join(self.b), len(self.b)),
                ("shared", ", ".join(self.intersection), len(self.intersection)),
                ("only a", ", ".join(self.only_a), len(self.only_a)),
                ("only b", ", ".join(self.only_b), len(self.only_b)),
                ("Jaccard", "", self.jaccard),
            ],
        )


def _layer_names(name, value) -> list:
    if hasattr(value, "problem_layers"):
        value = value.problem_layers
    if isinstance(value, str):
        raise TypeError(f"{name} must be a collection of layer names, not one string")
    try:
        names = list(dict.fromkeys(value))
    except TypeError:
        raise TypeError(
            f"{name} must be a collection of layer names or a Localization, got "
            f"{type(value).__name__}"
        ) from None
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{name} must hold layer names (str)")
    return names


def compare_layers(a, b) -> LayerComparison:
    """Overlap of two layer selections (lists of names or Localizations), order of ``a`` kept."""
    a, b = _layer_names("a", a), _layer_names("b", b)
    union = a + [name for name in b if name not in a]
    shared = [name for name in a if name in b]
    return LayerComparison(
        a=a,
        b=b,
        intersection=shared,
        union=union,
        only_a=[name for name in a if name not in b],
        only_b=[name for name in b if name not in a],
        jaccard=len(shared) / len(union) if union else 1.0,
    )


@dataclass
class ErrorComparison(Report):
    """The paper's Table 7 categories for any number (>= 2) of models on one example set."""

    models: list
    num_examples: int
    errors: dict  # {model: errors}
    common_errors: int  # every model wrong
    all_correct: int
    only_wrong: dict  # {model: examples only this model gets wrong}
    correct_wrong: list  # [{"correct": X, "wrong": Y, "count": n}] for every ordered pair

    def to_markdown(self) -> str:
        rows = [(f"Common errors (all {len(self.models)} wrong)", self.common_errors)]
        rows += [(f"Only {m} wrong", self.only_wrong[m]) for m in self.models]
        rows += [
            (f"{r['correct']} correct, {r['wrong']} wrong", r["count"]) for r in self.correct_wrong
        ]
        rows += [(f"{m} errors", self.errors[m]) for m in self.models]
        return markdown_table(["Category", "Count"], rows)


def compare_errors(predictions: dict, labels) -> ErrorComparison:
    """Error overlap between models: ``predictions`` is ``{model name: predicted classes}``."""
    if not isinstance(predictions, dict) or len(predictions) < 2:
        raise ValueError("predictions must be a dict of at least two {model name: predictions}")
    labels, preds = check_predictions(labels, {str(k): v for k, v in predictions.items()})
    wrong = {name: p != labels for name, p in preds.items()}
    models = list(wrong)
    stacked = [wrong[m] for m in models]
    any_wrong = stacked[0].clone()
    all_wrong = stacked[0].clone()
    for w in stacked[1:]:
        any_wrong |= w
        all_wrong &= w
    only = {}
    for m in models:
        others = [wrong[o] for o in models if o != m]
        others_wrong = others[0].clone()
        for w in others[1:]:
            others_wrong |= w
        only[m] = int((wrong[m] & ~others_wrong).sum())
    pairs = [
        {"correct": x, "wrong": y, "count": int((~wrong[x] & wrong[y]).sum())}
        for x, y in permutations(models, 2)
    ]
    return ErrorComparison(
        models=models,
        num_examples=labels.numel(),
        errors={m: int(wrong[m].sum()) for m in models},
        common_errors=int(all_wrong.sum()),
        all_correct=int((~any_wrong).sum()),
        only_wrong=only,
        correct_wrong=pairs,
    )
