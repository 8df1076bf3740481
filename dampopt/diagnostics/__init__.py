"""The paper's Scan -> Localize -> Diagnose -> Treat -> Verify pipeline, for any classifier.

1. Scan: :func:`scan_schedule`, :class:`RegimeMonitor` - damping regime of every epoch.
2. Localize: :func:`localize` - layer groups the failures pull on, each with a 95% interval and
   a p-value against "no more than other examples do"; ``rule="significant"`` (Holm).
3. Diagnose: :func:`diagnose` - most frequent confusion pairs, each with its layer group, or
   "not distinguishable".
4. Treat: :func:`treat` (with :func:`friction_mask`) - retrain only those groups, on a copy;
   :func:`treat_controls` - the same budget on unflagged, random, all and largest groups;
   ``treat(adapter="lora")`` with :func:`lora_targets` - surgical LoRA on those groups only.
5. Verify: :func:`verify`, :func:`compare_treatments`, :func:`compute_saving` - fixed/new errors
   and exact McNemar p-values, on examples the localization did not see (:func:`split_halves`).

Compare: :func:`compare_layers`, :func:`compare_errors`. Every result is a dataclass with
``to_dict()`` (JSON-ready) and ``to_markdown()``; nothing here prints, plots or downloads.
"""

from .compare import ErrorComparison, LayerComparison, compare_errors, compare_layers
from .controls import ARMS, ArmResult, ControlledTreatment, split_halves, treat_controls
from .diagnose import ConfusionPair, Diagnosis, confusion_pairs, diagnose, pair_gradients
from .groups import layer_groups, resolve_groups
from .localize import (
    CRITERIA,
    RULES,
    ErrorGradients,
    Localization,
    error_gradients,
    localize,
    select_problem_layers,
)
from .lora import lora_targets
from .scan import RegimeMonitor, ScanReport, ScanRow, cosine_schedule, scan_schedule
from .treat import OPTIMIZERS, TreatReport, friction_mask, treat
from .verify import (
    ComputeSaving,
    TreatmentComparison,
    Verification,
    compare_treatments,
    compute_saving,
    mcnemar_exact,
    predict,
    verify,
)

__all__ = [
    "ARMS",
    "ArmResult",
    "CRITERIA",
    "ControlledTreatment",
    "OPTIMIZERS",
    "RULES",
    "ComputeSaving",
    "ConfusionPair",
    "Diagnosis",
    "ErrorComparison",
    "ErrorGradients",
    "LayerComparison",
    "Localization",
    "RegimeMonitor",
    "ScanReport",
    "ScanRow",
    "TreatReport",
    "TreatmentComparison",
    "Verification",
    "compare_errors",
    "compare_layers",
    "compare_treatments",
    "compute_saving",
    "confusion_pairs",
    "cosine_schedule",
    "diagnose",
    "error_gradients",
    "friction_mask",
    "layer_groups",
    "localize",
    "lora_targets",
    "mcnemar_exact",
    "pair_gradients",
    "predict",
    "resolve_groups",
    "scan_schedule",
    "select_problem_layers",
    "split_halves",
    "treat",
    "treat_controls",
    "verify",
]
