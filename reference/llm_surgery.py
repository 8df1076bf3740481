"""The paper's Tier 1-2 experiment (Sec. 8.3) on a small causal language model, on 2 CPU cores.

    python reference/llm_surgery.py --preset quick --out runs/llm-surgery

Model: GPT-2 architecture from transformers, random init, a few layers, a character vocabulary
(printable ASCII, so no tokenizer download), trained here from scratch.

Corpus (no hub download; both are text a package installs):
- general text: the docstrings of a fixed list of Python standard-library modules (shipped
  with CPython itself): the model is pre-trained on part of it; another part is the held-out
  general text whose perplexity and errors measure side effects.
- failure domain: the licence texts of Debian's ``base-files`` package
  (``/usr/share/common-licenses``: Apache-2.0, Artistic, BSD, GFDL, GPL, LGPL, MPL, CC0), a
  register (legal prose) the model was not trained on. Its mispredicted characters are the
  failures. The licences are split by document into a part the diagnosis and the repair see
  and a held-out part they never see.

Tier 1 (is the failure signal sparse, and specific?): token-level ``localize`` per block,
``criterion="specificity"`` (each block's gradient share on failures over its share on
correct characters of the same batch: the same-size reference sample), intervals and Holm
p-values. Controls: the same pass with random "failures" (as many, drawn among the same
characters: calibration, should flag nothing) and with the general text's own errors (is the
profile the domain's or just that of hard characters?). Held-out check: the same localization
on the held-out licences' failures.

Tier 2 (surgical LoRA): LoRA adapters of one rank on the flagged block(s) vs on every block
("full") vs on as many random other blocks, the same optimizer, lr schedule and steps, several
seeds, trained on the seen licence text. Measured on the held-out licence characters (fixed /
new failures, exact McNemar, surgical vs full paired per seed), on held-out general text
(perplexity and new errors: side effects), trainable parameters and wall time.

Writes ``report.md``, ``results.json`` (and ``figure.png`` when matplotlib is installed)
under ``--out``. ``--preset smoke`` (< 1 minute) is the test suite's; ``quick`` (<= 10
minutes on 2 CPU cores) is the one to read.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: the package runs it
    from dampopt.reference import run_file

    run_file(__file__)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dampopt.diagnostics import (  # noqa: E402
    compare_treatments,
    layer_groups,
    localize,
    lora_targets,
    predict,
    treat,
    verify,
)

from . import files  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections concurrent.futures "
    "configparser contextlib copy csv dataclasses datetime decimal difflib email email.message "
    "enum filecmp fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac "
    "html.parser http.client http.cookies http.server imaplib inspect io ipaddress itertools "
    "json logging lzma mailbox mimetypes numbers operator optparse os pathlib pickle pprint "
    "queue random re sched secrets selectors shlex shutil signal smtplib socket socketserver "
    "sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap threading "
    "timeit tokenize traceback types typing unittest urllib.parse urllib.request uuid "
    "warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo"
).split()
# characters: printable ASCII (95) plus newline; anything else becomes UNKNOWN
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(ALPHABET)
VOCAB = len(ALPHABET) + 1


@dataclass(frozen=True)
class Preset:
    layers: int
    width: int
    heads: int
    context: int  # characters per window (the model predicts context - 1 of them)
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    localize_windows: int  # licence windows the diagnosis sees
    eval_windows: int  # held-out licence windows and held-out general windows, each
    blocks: int  # cells of the localization
    flag: int  # blocks flagged for surgery (top by specificity)
    rank: int
    alpha: float
    repair_epochs: int
    repair_windows: int  # licence windows the repair trains on (the seen part)
    repair_batch: int
    repair_lr: float
    seeds: tuple
    control_draws: int  # random-failure draws of the Tier 1 calibration control


PRESETS = {
    "smoke": Preset(layers=4, width=32, heads=4, context=32, pretrain_steps=100,
                    pretrain_batch=16, pretrain_lr=3e-3, localize_windows=32, eval_windows=32,
                    blocks=8, flag=1, rank=4, alpha=8, repair_epochs=1, repair_windows=32,
                    repair_batch=16, repair_lr=3e-3, seeds=(0,), control_draws=1),
    "quick": Preset(layers=6, width=64, heads=4, context=64, pretrain_steps=1200,
                    pretrain_batch=32, pretrain_lr=3e-3, localize_windows=128, eval_windows=192,
                    blocks=32, flag=1, rank=8, alpha=16, repair_epochs=2, repair_windows=256,
                    repair_batch=16, repair_lr=3e-3, seeds=(0, 1, 2), control_draws=10),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Corpus


def general_text() -> list[str]:
    """One document per standard-library module: its docstring and those of its public API."""
    documents = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # e.g. a Python built without sqlite3 or ssl
                continue
            parts = [inspect.getdoc(module) or ""]
            for attribute in sorted(vars(module)):
                value = getattr(module, attribute)
                if attribute.startswith("_") or getattr(value, "__module__", None) != name:
                    continue
                if inspect.isclass(value) or inspect.isfunction(value):
                    parts.append(inspect.getdoc(value) or "")
            documents.append("\n\n".join(p for p in parts if p))
    return documents


def failure_text() -> list[str]:
    """One document per distinct licence file of ``/usr/share/common-licenses``."""
    if not LICENSES.is_dir():
        raise FileNotFoundError(
            f"{LICENSES} is missing: it is Debian's base-files package (apt-get install "
            "base-files), the failure domain of this experiment"
        )
    seen, documents = set(), []
    for path in sorted(LICENSES.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        documents.append(real.read_text(encoding="utf-8", errors="replace"))
    return documents


def encode(text: str) -> list[int]:
    index = {c: i for i, c in enumerate(ALPHABET)}
    return [index.get(c, UNKNOWN) for c in text]


def windows(documents: list[str], context: int) -> torch.Tensor:
    """Non-overlapping windows of ``context`` characters, document by document."""
    rows = []
    for document in documents:
        ids = encode(document)
        rows += [ids[i : i + context] for i in range(0, len(ids) - context + 1, context)]
    return torch.tensor(rows, dtype=torch.long)


def split_documents(documents: list[str], seed: int) -> tuple[list, list]:
    """Documents in a seeded order, cut where half of the characters are reached."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    total, running, first = sum(len(d) for d in documents), 0, []
    for i in order:
        if running >= total / 2:
            break
        first.append(i)
        running += len(documents[i])
    return [documents[i] for i in first], [documents[i] for i in order if i not in first]


def sample(rows: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    if len(rows) < count:
        raise ValueError(f"corpus too small: {len(rows)} windows, {count} needed")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return rows[order[:count].sort().values]


def loader(rows: torch.Tensor, batch: int, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0) if shuffle else None
    return DataLoader(TensorDataset(rows, rows), batch_size=batch, shuffle=shuffle,
                      generator=generator)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model


def build_model(preset: Preset):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=preset.context, n_embd=preset.width,
        n_layer=preset.layers, n_head=preset.heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def pretrain(model, rows: torch.Tensor, preset: Preset) -> dict:
    """AdamW on the general text, cosine lr: the 'pre-trained model' of the experiment."""
    opt = torch.optim.AdamW(model.parameters(), lr=preset.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, preset.pretrain_steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(preset.pretrain_steps):
        batch = rows[torch.randint(len(rows), (preset.pretrain_batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"steps": preset.pretrain_steps, "final_loss": statistics.fmean(losses[-20:]),
            "seconds": time.perf_counter() - start}  # fmt: skip


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 64) -> float:
    """exp of the mean next-character cross-entropy over ``rows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1]
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def block_groups(model) -> dict:
    """One group per transformer block: the unit Tier 1 ranks and Tier 2 adapts."""
    return {name: params for name, params in layer_groups(model, depth="auto").items()
            if name.startswith("transformer.h.")}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Tier 1


def tier1_profile(found) -> dict:
    return {
        "num_failures": found.num_errors,
        "num_units": found.num_examples,
        "num_cells": found.num_cells,
        "ranking": found.ranking,
        "specificity": found.specificity,
        "intervals": found.intervals,
        "holm_p": found.adjusted_p_values,
        "significant": [g for g in found.ranking if (found.adjusted_p_values.get(g) or 1) < 0.05],
    }


def random_failures(model, rows: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """A bool mask [windows, context]: each predicted character a failure with prob ``rate``."""
    mask = torch.rand(rows.shape, generator=torch.Generator().manual_seed(seed)) < rate
    mask[:, 0] = False  # position 0 is never predicted (shift_labels)
    return mask


def tier1(model, seen: torch.Tensor, held_out: torch.Tensor, general: torch.Tensor,
          preset: Preset, progress) -> dict:  # fmt: skip
    groups = block_groups(model)
    common = dict(groups=groups, criterion="specificity", rule="topk", k=preset.flag,
                  shift_labels=True, blocks=preset.blocks, progress=progress)  # fmt: skip
    found = localize(model, loader(seen, 16), **common)
    rate = found.num_errors / found.num_examples
    controls = [
        localize(
            model, loader(seen, 16), failures=random_failures(model, seen, rate, draw), **common
        )  # fmt: skip
        for draw in range(1, preset.control_draws + 1)
    ]
    control = controls[0]
    replicate = localize(model, loader(held_out, 16), **common)
    general_errors = localize(model, loader(general, 16), **common)
    result = {
        "flagged": found.problem_layers,
        "failures": tier1_profile(found),
        "random_failures_control": tier1_profile(control),
        "held_out_replicate": tier1_profile(replicate),
        "general_text_errors": tier1_profile(general_errors),
        "failure_rate": rate,
    }
    sig = result["failures"]["significant"]
    result["sparse"] = 0 < len(sig) <= max(1, len(groups) // 3)
    # calibration: with failures drawn at random there is nothing to find; Holm keeps the
    # chance that a draw flags any block at or below 5% when the test's assumptions hold
    flagged_by_draw = [tier1_profile(c)["significant"] for c in controls]
    result["random_control_draws"] = {
        "draws": len(controls),
        "significant_per_draw": flagged_by_draw,
        "draws_flagging_any": sum(bool(f) for f in flagged_by_draw),
        "draws_flagging_the_flagged_block": sum(
            bool(set(f) & set(found.problem_layers)) for f in flagged_by_draw
        ),
    }
    result["control_flags_nothing"] = not any(flagged_by_draw)
    result["replicates"] = replicate.problem_layers == found.problem_layers
    # the domain's own signal, or that of hard characters anywhere?
    result["same_top_block_as_general_errors"] = (
        general_errors.problem_layers == found.problem_layers
    )
    return result, found


# ---------------------------------------------------------------------------------------------
# Tier 2


def tier2(model, found, repair: torch.Tensor, failure_eval: torch.Tensor,
          general_eval: torch.Tensor, preset: Preset, progress) -> dict:  # fmt: skip
    blocks = list(block_groups(model))
    flagged = list(found.problem_layers)
    eval_failure, eval_general = loader(failure_eval, 32), loader(general_eval, 32)
    labels_f, before_f = predict(model, eval_failure, shift_labels=True)
    labels_g, before_g = predict(model, eval_general, shift_labels=True)
    ppl_before = perplexity(model, general_eval)
    # one untimed treatment first: the first one pays one-off costs (allocator, peft import)
    treat(model, loader(repair[: preset.repair_batch], preset.repair_batch), flagged, epochs=1,
          adapter="lora", rank=preset.rank, shift_labels=True, progress=False)  # fmt: skip
    runs, comparisons = [], []
    for turn, seed in enumerate(preset.seeds):
        others = [b for b in blocks if b not in flagged]
        random_blocks = sorted(random.Random(seed).sample(others, len(flagged)),
                               key=blocks.index)  # fmt: skip
        # "full-low-rank": every block at the rank that gives about the surgical arm's
        # parameter count: placement against parameter count
        low_rank = max(1, round(preset.rank * len(flagged) / len(blocks)))
        arms = [("surgical", flagged, preset.rank), ("full", blocks, preset.rank),
                ("random-block", random_blocks, preset.rank),
                ("full-low-rank", blocks, low_rank)]  # fmt: skip
        arms = arms[turn % 4 :] + arms[: turn % 4]  # no arm always first: wall times are fair
        predictions = {}
        for arm, layers, rank in arms:
            adapted, report = treat(
                model, loader(repair, preset.repair_batch, shuffle=True), layers,
                epochs=preset.repair_epochs, lr=preset.repair_lr, optimizer="adamw",
                adapter="lora", rank=rank, alpha=preset.alpha * rank / preset.rank,
                seed=seed, shift_labels=True, progress=progress,
            )  # fmt: skip
            _, after_f = predict(adapted, eval_failure, shift_labels=True)
            _, after_g = predict(adapted, eval_general, shift_labels=True)
            on_failures = verify(labels_f, before_f, after_f)
            on_general = verify(labels_g, before_g, after_g)
            predictions[arm] = after_f
            runs.append({
                "arm": arm, "seed": seed, "blocks": layers, "rank": rank,
                "trainable_parameters": report.trainable_parameters,
                "parameter_fraction": report.element_fraction,
                "wall_time_s": report.wall_time_s, "steps": report.steps,
                "fixed": on_failures.fixed, "new": on_failures.new, "net": on_failures.net,
                "p_value": on_failures.p_value, "accuracy_after": on_failures.accuracy_after,
                "general_new_errors": on_general.new, "general_fixed": on_general.fixed,
                "general_net": on_general.net,
                "general_perplexity": perplexity(adapted, general_eval),
            })  # fmt: skip
            del adapted
        for control in ("full", "random-block", "full-low-rank"):
            c = compare_treatments(labels_f, predictions["surgical"], predictions[control],
                                   names=("surgical", control))  # fmt: skip
            comparisons.append({"seed": seed, "control": control, "difference": c.difference,
                                "p_value": c.p_value})  # fmt: skip
    summary = {}
    for arm in ("surgical", "full", "random-block", "full-low-rank"):
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {
            key: _mean_std([r[key] for r in mine])
            for key in ("fixed", "new", "net", "general_new_errors", "general_perplexity",
                        "trainable_parameters", "wall_time_s")
        }  # fmt: skip
        # side effects per repair: perplexity rise and new general errors per net fix
        net = summary[arm]["net"]["mean"]
        rise = summary[arm]["general_perplexity"]["mean"] - ppl_before
        summary[arm]["perplexity_rise_per_net_fix"] = rise / net if net > 0 else None
        summary[arm]["general_new_errors_per_net_fix"] = (
            summary[arm]["general_new_errors"]["mean"] / net if net > 0 else None
        )
    return {
        "flagged": flagged,
        "low_rank": low_rank,
        "failure_eval_units": int(labels_f.numel()),
        "failure_accuracy_before": float((before_f == labels_f).double().mean()),
        "general_eval_units": int(labels_g.numel()),
        "general_perplexity_before": ppl_before,
        "runs": runs,
        "comparisons": comparisons,
        "summary": summary,
        "hypotheses": _tier2_verdict(summary, ppl_before, comparisons),
    }


def _mean_std(values):
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}  # fmt: skip


def _tier2_verdict(summary, ppl_before, comparisons) -> dict:
    surgical, full = summary["surgical"], summary["full"]
    rise = {arm: summary[arm]["general_perplexity"]["mean"] - ppl_before for arm in summary}
    # "comparable" needs something to compare with: undecided (None) when full LoRA fixed
    # nothing net
    comparable = (surgical["net"]["mean"] >= 0.8 * full["net"]["mean"]
                  if full["net"]["mean"] > 0 else None)  # fmt: skip
    vs_random = [c for c in comparisons if c["control"] == "random-block"]
    return {
        "comparable_fixes (surgical net >= 80% of full's)": comparable,
        "fewer_side_effects (smaller perplexity rise than full)": rise["surgical"] < rise["full"],
        "fewer_side_effects_per_fix (smaller perplexity rise per net fix than full)": (
            None
            if None
            in (surgical["perplexity_rise_per_net_fix"], full["perplexity_rise_per_net_fix"])
            else surgical["perplexity_rise_per_net_fix"] < full["perplexity_rise_per_net_fix"]
        ),  # fmt: skip
        "fewer_trainable_parameters": surgical["trainable_parameters"]["mean"]
        < full["trainable_parameters"]["mean"],
        "less_wall_time": surgical["wall_time_s"]["mean"] < full["wall_time_s"]["mean"],
        "beats_random_blocks (paired p < 0.05 in every seed)": all(
            c["difference"] > 0 and c["p_value"] < 0.05 for c in vs_random
        ),
        "beats_full_low_rank (paired p < 0.05 in every seed)": all(
            c["difference"] > 0 and c["p_value"] < 0.05
            for c in comparisons
            if c["control"] == "full-low-rank"
        ),
        "perplexity_rise": rise,
    }


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(stat, digits=4):
    mean, std = stat["mean"], stat["std"]
    return f"{mean:.{digits}g}" if std is None else f"{mean:.{digits}g} ± {std:.2g}"


def report_markdown(results: dict) -> str:
    t1, t2, setup = results["tier1"], results["tier2"], results["setup"]
    lines = [
        f"# Surgical LoRA on a small causal LM (preset {setup['preset']})",
        "",
        f"GPT-2 architecture, {setup['layers']} blocks, width {setup['width']}, "
        f"{setup['parameters']} parameters, character vocabulary ({VOCAB}), random init, "
        f"pre-trained {results['pretrain']['steps']} steps on Python standard-library "
        f"docstrings (final loss {results['pretrain']['final_loss']:.3f}). Failure domain: the "
        "licence texts of Debian's base-files (/usr/share/common-licenses), split by document "
        "into a seen and a held-out part. Total wall time "
        f"{results['wall_time_s']:.0f} s ({results['threads']} torch thread(s); stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items())
        + ").",
        "",
        "## Tier 1: where do the failures pull?",
        "",
        f"Failures: {t1['failures']['num_failures']} mispredicted characters of "
        f"{t1['failures']['num_units']} (rate {t1['failure_rate']:.2f}); criterion "
        "specificity (1 = the block's share of the failures' gradient equals its share of "
        "correct characters'), 95% intervals, Holm p over blocks.",
        "",
        "| Block | failures (seen) | random-failure control | failures (held out) | "
        "general-text errors |",
        "|---|---|---|---|---|",
    ]
    for block in t1["failures"]["specificity"]:
        cells = []
        for key in ("failures", "random_failures_control", "held_out_replicate",
                    "general_text_errors"):  # fmt: skip
            profile = t1[key]
            value = profile["specificity"][block]
            low, high = profile["intervals"][block] or (float("nan"), float("nan"))
            p = profile["holm_p"][block]
            cells.append(f"{value:.3f} [{low:.3f}, {high:.3f}] p={p:.2g}")
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- flagged for surgery (top {setup['flag']} by specificity): {', '.join(t1['flagged'])}",
        f"- significant (Holm p < 0.05) on the failures: "
        f"{', '.join(t1['failures']['significant']) or 'none'}; on random failures: "
        f"{', '.join(t1['random_failures_control']['significant']) or 'none'}; held out: "
        f"{', '.join(t1['held_out_replicate']['significant']) or 'none'}; general-text "
        f"errors: {', '.join(t1['general_text_errors']['significant']) or 'none'}",
        f"- random-failure control ({t1['random_control_draws']['draws']} draws, the table shows "
        f"the first): {t1['random_control_draws']['draws_flagging_any']} draw(s) flagged a "
        f"block, {t1['random_control_draws']['draws_flagging_the_flagged_block']} of them the "
        "flagged one",
        f"- sparse (1 to a third of the blocks significant): {t1['sparse']}; random-failure "
        f"control flags nothing: {t1['control_flags_nothing']}; held-out top block the same: "
        f"{t1['replicates']}; the general text's own errors flag the same top block (so the "
        f"profile is not specific to the domain): {t1['same_top_block_as_general_errors']}",
        "",
        "## Tier 2: surgical vs full vs random-block vs low-rank full LoRA",
        "",
        f"Rank {setup['rank']}, alpha {setup['alpha']} (full-low-rank: every block at rank "
        f"{t2['low_rank']}, alpha scaled alike, about the surgical arm's parameters), AdamW, "
        "cosine lr from "
        f"{setup['repair_lr']}, {t2['runs'][0]['steps']} steps per arm, seeds "
        f"{setup['seeds']}. Held-out licence characters: {t2['failure_eval_units']} "
        f"(accuracy before {t2['failure_accuracy_before']:.3f}); held-out general text: "
        f"{t2['general_eval_units']} characters, perplexity before "
        f"{t2['general_perplexity_before']:.3f}.",
        "",
        "| Arm | fixed | new | net | general: new errors | general perplexity | trainable "
        "params | wall s | ppl rise per net fix | general new errors per net fix |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in t2["summary"].items():
        per_fix = [s["perplexity_rise_per_net_fix"], s["general_new_errors_per_net_fix"]]
        per_fix = ["—" if v is None else f"{v:.3g}" for v in per_fix]
        lines.append(
            f"| {arm} | {_fmt(s['fixed'])} | {_fmt(s['new'])} | {_fmt(s['net'])} | "
            f"{_fmt(s['general_new_errors'])} | {_fmt(s['general_perplexity'])} | "
            f"{_fmt(s['trainable_parameters'])} | {_fmt(s['wall_time_s'], 3)} | "
            f"{per_fix[0]} | {per_fix[1]} |"
        )
    lines += ["", "Surgical minus control, correct held-out licence characters (paired exact "
              "McNemar), per seed:", ""]  # fmt: skip
    for c in t2["comparisons"]:
        lines.append(f"- seed {c['seed']}, vs {c['control']}: {c['difference']:+d} "
                     f"(p={c['p_value']:.3g})")  # fmt: skip
    lines += ["", "Hypotheses (Tier 2):", ""]
    for key, value in t2["hypotheses"].items():
        if key != "perplexity_rise":
            lines.append(f"- {key}: **{value}**")
    rise = t2["hypotheses"]["perplexity_rise"]
    lines.append("- perplexity rise: " + ", ".join(f"{a} {v:+.4f}" for a, v in rise.items()))
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t1, t2 = results["tier1"], results["tier2"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    blocks = list(t1["failures"]["specificity"])
    for offset, (key, label) in enumerate((("failures", "failures"),
                                           ("random_failures_control", "random failures"),
                                           ("held_out_replicate", "held out"))):  # fmt: skip
        values = [t1[key]["specificity"][b] for b in blocks]
        spans = [t1[key]["intervals"][b] or (v, v) for b, v in zip(blocks, values)]
        x = [i + 0.25 * (offset - 1) for i in range(len(blocks))]
        err = [[v - s[0] for v, s in zip(values, spans)], [s[1] - v for v, s in zip(values, spans)]]
        left.errorbar(x, values, yerr=err, fmt="o", capsize=2, label=label)
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xticks(range(len(blocks)), [b.rsplit(".", 1)[1] for b in blocks])
    left.set(xlabel="block", ylabel="specificity", title="Tier 1")
    left.legend(fontsize=7)
    for arm, s in t2["summary"].items():
        right.errorbar(s["general_perplexity"]["mean"] - t2["general_perplexity_before"],
                       s["net"]["mean"], xerr=s["general_perplexity"]["std"] or 0,
                       yerr=s["net"]["std"] or 0, fmt="o", capsize=2, label=arm)  # fmt: skip
    right.set(xlabel="general perplexity rise", ylabel="net fixed (held-out licences)",
              title="Tier 2")  # fmt: skip
    right.legend(fontsize=7)
    fig.tight_layout()
    with files.atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def run(preset_name: str, out: Path, progress) -> dict:
    preset = PRESETS[preset_name]
    start = time.perf_counter()
    torch.manual_seed(0)
    general_seen, general_held = split_documents(general_text(), seed=0)
    licenses_seen, licenses_held = split_documents(failure_text(), seed=0)
    general_train = windows(general_seen, preset.context)
    general_eval = sample(windows(general_held, preset.context), preset.eval_windows, 0)
    seen = windows(licenses_seen, preset.context)
    localize_rows = sample(seen, preset.localize_windows, 1)
    repair_rows = sample(seen, min(preset.repair_windows, len(seen)), 2)
    held = windows(licenses_held, preset.context)
    failure_eval = sample(held, preset.eval_windows, 3)
    replicate_rows = sample(held, preset.localize_windows, 4)

    model = build_model(preset)
    stages = {}
    print(f"[llm_surgery] pre-training {preset.pretrain_steps} steps", file=sys.stderr)
    pretrained = pretrain(model, general_train, preset)
    stages["pretrain"] = time.perf_counter() - start
    print("[llm_surgery] tier 1: localize", file=sys.stderr)
    t1, found = tier1(model, localize_rows, replicate_rows, general_eval, preset, progress)
    stages["tier1"] = time.perf_counter() - start - sum(stages.values())
    print(f"[llm_surgery] tier 2: LoRA arms, flagged {found.problem_layers}", file=sys.stderr)
    t2 = tier2(model, found, repair_rows, failure_eval, general_eval, preset, progress)
    stages["tier2"] = time.perf_counter() - start - sum(stages.values())
    results = {
        "setup": {**asdict(preset), "preset": preset_name,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "targets": lora_targets(model, found.problem_layers),
                  "corpus": {"general": "docstrings of Python standard-library modules "
                                        f"(Python {sys.version.split()[0]})",
                             "failure_domain": str(LICENSES) + " (Debian base-files)",
                             "general_documents": [len(general_seen), len(general_held)],
                             "failure_documents": [len(licenses_seen), len(licenses_held)]}},
        "pretrain": pretrained,
        "tier1": t1,
        "tier2": t2,
        "stage_seconds": stages,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    results["wall_time_s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    # atomically: an interrupted run leaves the old file or the whole new one, never half
    files.write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    files.write_text(out / "report.md", report_markdown(results))
    results["figure"] = figure(results, out / "figure.png")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/llm-surgery"))
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: small models on shared cores run fastest)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    results = run(args.preset, args.out, progress=False if args.no_progress else None)
    print(report_markdown(results))
    print(f"wrote {args.out / 'report.md'} and results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
