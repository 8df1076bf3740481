"""Surgical LoRA: lora_targets, treat(adapter="lora") and treat_controls with adapters."""

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dampopt.diagnostics import layer_groups, localize, lora_targets, treat, treat_controls

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, LENGTH, WIDTH, RANK = 23, 10, 32, 4
BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
# LoRA adds A [r, in] and B [out, r]: r * (in + out) per module; GPT-2's MLP is 4x wide
PER_BLOCK = RANK * ((WIDTH + 3 * WIDTH) + (WIDTH + WIDTH) + (WIDTH + 4 * WIDTH) * 2)


def _gpt2(layers=3):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _loader(seed=3, examples=24):
    ids = torch.randint(0, VOCAB, (examples, LENGTH), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(ids, ids), batch_size=8)


def _localization(model):
    return localize(model, _loader(), groups=layer_groups(model, depth="auto"),
                    shift_labels=True, criterion="specificity", rule="topk", k=1)  # fmt: skip


def _adapted(wrapped):
    return sorted(name for name, m in wrapped.get_base_model().named_modules()
                  if hasattr(m, "lora_A") and len(m.lora_A))  # fmt: skip


def test_lora_targets_on_gpt2_are_the_conv1d_projections_of_the_flagged_blocks_only():
    model = _gpt2()
    found = _localization(model)
    (flagged,) = found.problem_layers
    targets = lora_targets(model, found)
    assert targets == sorted(f"{flagged}.{suffix}" for suffix in BLOCK)
    modules = dict(model.named_modules())
    assert all(name in modules for name in targets)
    assert lora_targets(model, ["transformer.h.0", "transformer.h.2"]) == sorted(
        f"transformer.h.{i}.{suffix}" for i in (0, 2) for suffix in BLOCK
    )
    # nn.Linear alone finds nothing in GPT-2's blocks: they compute with Conv1D
    with pytest.raises(ValueError, match="hold no module of type"):
        lora_targets(model, found, module_types=(nn.Linear,))
    # the tied lm_head (a Linear sharing transformer.wte.weight) belongs to the embedding group
    assert lora_targets(model, ["transformer.wte"]) == ["lm_head"]
    # peft given the list as it is wraps exactly those modules
    wrapped = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=RANK, target_modules=targets,
                                                           fan_in_fan_out=True))  # fmt: skip
    assert _adapted(wrapped) == targets


def test_lora_targets_on_bert_are_the_linears_of_the_flagged_layer():
    model = _bert()
    targets = lora_targets(model, ["bert.encoder.layer.1"])
    assert targets == sorted(
        f"bert.encoder.layer.1.{suffix}"
        for suffix in ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense")
    )  # fmt: skip
    assert all(isinstance(dict(model.named_modules())[n], nn.Linear) for n in targets)
    wrapped = peft.get_peft_model(_bert(), peft.LoraConfig(r=RANK, target_modules=targets))
    assert _adapted(wrapped) == targets


def test_lora_targets_rejects_bad_input():
    model = _gpt2()
    found = _localization(model)
    with pytest.raises(ValueError, match="unknown group"):
        lora_targets(model, ["transformer.h.9"])
    found.problem_layers = []
    with pytest.raises(ValueError, match="flagged no group"):
        lora_targets(model, found)
    with pytest.raises(ValueError, match="module_types"):
        lora_targets(model, ["transformer.h.0"], module_types=(int,))


def _state(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_lora_treat_trains_only_adapters_and_leaves_every_base_weight_bit_identical():
    model = _gpt2()
    found = _localization(model)
    before = _state(model)
    rng = torch.get_rng_state()
    adapted, report = treat(model, _loader(), found, epochs=2, lr=0.05, adapter="lora",
                            rank=RANK, alpha=8, seed=0, shift_labels=True,
                            progress=False)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rng)  # the adapters' init did not use the caller's
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the input: untouched
    assert isinstance(adapted, peft.PeftModel)
    base = dict(adapted.get_base_model().named_parameters())
    lora = {name: p for name, p in base.items() if "lora_" in name}
    assert (
        {n.split(".lora_")[0] for n in lora}
        == set(report.targets)
        == set(lora_targets(model, found))
    )
    for name, p in base.items():  # the copy's base weights: bit-identical, frozen
        if "lora_" not in name:
            assert not p.requires_grad and torch.equal(p, before[name.replace(".base_layer", "")])
    assert all(p.requires_grad for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B left zero: moved
    assert report.trainable_parameters == report.trainable_elements == PER_BLOCK
    assert report.total_elements == sum(p.numel() for p in model.parameters())
    assert report.adapter == "lora" and report.rank == RANK and report.lora_alpha == 8
    assert report.layers == found.problem_layers and report.wall_time_s > 0
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert "lora (r=4, alpha=8, 4 modules)" in report.to_markdown()
    assert report.to_dict()["targets"] == report.targets

    # the same seed: the same adapters (init and batches); merged: the same function
    again, _ = treat(model, _loader(), found, epochs=2, lr=0.05, adapter="lora", rank=RANK,
                     alpha=8, seed=0, shift_labels=True, progress=False)  # fmt: skip
    assert all(torch.equal(p, dict(again.named_parameters())[n])
               for n, p in adapted.named_parameters())  # fmt: skip
    merged, merged_report = treat(model, _loader(), found, epochs=2, lr=0.05, adapter="lora",
                                  rank=RANK, alpha=8, seed=0, shift_labels=True, merge=True,
                                  progress=False)  # fmt: skip
    assert type(merged) is type(model) and merged_report.merged
    ids = next(iter(_loader()))[0]
    adapted.eval()
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    for name, p in merged.named_parameters():  # merged: only the targets' weights changed
        changed = not torch.equal(p, before[name])
        assert changed == (name.rsplit(".", 1)[0] in report.targets and name.endswith("weight"))


def test_lora_treat_with_adamw_and_bad_arguments():
    model = _gpt2()
    found = _localization(model)
    before = _state(model)
    _, report = treat(model, _loader(), found, epochs=1, lr=1e-3, adapter="lora", rank=RANK,
                      optimizer="adamw", seed=0, shift_labels=True, progress=False)  # fmt: skip
    assert report.optimizer == "adamw"
    for kwargs, match in (
        ({"adapter": "qlora"}, "adapter must be"),
        ({"adapter": "lora", "rank": 0}, "rank"),
        ({"adapter": "lora", "alpha": -1}, "alpha"),
        ({"merge": True}, "needs adapter"),
        ({"adapter": "lora", "mask": {}}, "mask"),
    ):
        with pytest.raises(ValueError, match=match):
            treat(model, _loader(), found, epochs=1, shift_labels=True, **kwargs)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_lora_treat_without_peft_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    model = _gpt2()
    with pytest.raises(ImportError, match=r"dampopt\[llm\]"):
        treat(model, _loader(), ["transformer.h.1"], epochs=1, adapter="lora",
              shift_labels=True)  # fmt: skip


def test_treat_controls_compares_lora_arms_at_the_same_rank_and_budget():
    model = _gpt2(layers=4)
    blocks_only = {
        name: params
        for name, params in layer_groups(model, depth="auto").items()
        if name.startswith("transformer.h.")
    }  # arms draw from blocks: all adaptable
    found = localize(model, _loader(), groups=blocks_only, shift_labels=True,
                     criterion="specificity", rule="topk", k=1)  # fmt: skip
    outcome = treat_controls(model, _loader(), found, _loader(seed=4, examples=16),
                             arms=("unflagged", "random", "all"), random_draws=1, seeds=(0, 1),
                             epochs=1, lr=0.05, adapter="lora", rank=RANK,
                             progress=False)  # fmt: skip
    blocks = {arm: sum(g.startswith("transformer.h.") for g in layers)
              for arm, layers in outcome.arms.items()}  # fmt: skip
    assert blocks["flagged"] == 1 and blocks["all"] == 4
    for result in outcome.results:  # LoRA on every block of the arm, the same rank
        assert result.trainable_elements == PER_BLOCK * blocks[result.arm]
    assert {r.steps for r in outcome.results} == {3}
    # token-level: the eval positions are the shifted, non-ignored labels
    assert outcome.num_examples == 16 * (LENGTH - 1)
    assert set(outcome.comparisons) == {"unflagged", "random-1", "all"}


def test_plain_treat_trains_a_causal_lm_on_its_tokens():
    """Without an adapter, treat scores the shifted tokens and skips ignored labels too."""
    model = _gpt2()
    ids = next(iter(_loader()))[0]
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt the loss ignores
    batch = DataLoader(TensorDataset(ids, labels), batch_size=len(ids))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    kept = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[:, 1:][kept])
    before = _state(model)
    corrected, report = treat(model, batch, ["transformer.h.1"], epochs=1, lr=0.01,
                              shift_labels=True, progress=False)  # fmt: skip
    # one step: its loss is the model's own mean over the kept, shifted tokens
    assert report.epoch_losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert report.adapter is None and report.trainable_parameters == report.trainable_elements
    changed = {n for n, p in corrected.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("transformer.h.1.") for n in changed)
    assert "transformer.h.1.attn.c_attn.weight" in changed
