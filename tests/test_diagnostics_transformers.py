"""Localize, diagnose, predict and verify on token-level and dict-batch tasks (tiny HF models)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dampopt.diagnostics import diagnose, layer_groups, localize, predict, verify

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, EXAMPLES = 23, 10, 24


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _tokens():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=generator)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt the loss ignores
    labels[::5, -2:] = -100  # and padding at the end of some examples
    return ids, labels


class DictDataset(Dataset):
    """HF-style examples: a dict per example, collated into a dict of batched tensors."""

    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.columns.items()}


def _group_norms_of_mean(model, loss, groups):
    names = list(groups)
    params = [p for name in names for p in groups[name]]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    by_id = {id(p): g for p, g in zip(params, grads)}
    return {
        name: math.sqrt(sum(float(by_id[id(p)].double().pow(2).sum())
                            for p in ps if by_id[id(p)] is not None))
        for name, ps in groups.items()
    }  # fmt: skip


def test_token_level_localize_on_gpt2_matches_a_hand_computation():
    model = _gpt2()
    ids, labels = _tokens()
    loader = DataLoader(DictDataset(input_ids=ids, labels=labels), batch_size=8)
    found = localize(model, loader, shift_labels=True, groups=layer_groups(model, depth=2))

    # by hand: one forward of everything, logits at t scored against the label at t + 1
    model.eval()
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    kept = target != -100
    wrong = kept & (logits.argmax(-1) != target)
    assert found.num_examples == int(kept.sum()) == 24 * 7 - 5 * 2
    assert found.num_errors == int(wrong.sum()) > 0
    rows, cols = wrong.nonzero(as_tuple=True)
    assert found.error_indices == [(int(r), int(c) + 1) for r, c in zip(rows, cols)]
    assert found.error_labels == target[wrong].tolist()
    assert found.error_predictions == logits.argmax(-1)[wrong].tolist()
    assert found.index_kind == "dataset"
    assert found.message.startswith(f"{found.num_errors} misclassified of 158 positions")
    losses = F.cross_entropy(logits[wrong], target[wrong], reduction="sum") / int(wrong.sum())
    expected = _group_norms_of_mean(model, losses, found.groups)
    assert list(found.grad_norms) == list(expected)
    for name, value in expected.items():
        assert found.grad_norms[name] == pytest.approx(value, rel=1e-4, abs=1e-7)
    assert found.grad_norms["transformer.h.0"] > 0 and found.num_cells >= 3
    # an ignored position is neither a failure nor a reference
    ignored = {(r, c) for r in range(EXAMPLES) for c in range(LENGTH) if labels[r, c] == -100}
    used = {tuple(u) for cell in found.evidence.cell_reference_indices for u in cell}
    used |= set(found.error_indices)
    assert not used & ignored


def test_token_level_localize_without_shift_equals_pre_shifted_labels():
    """shift_labels=True is exactly scoring logits[:, :-1] against labels[:, 1:]."""
    model = _gpt2()
    ids, labels = _tokens()

    class Shifted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits[:, :-1]

    groups = layer_groups(model, depth=2)
    shifted = localize(model, DataLoader(TensorDataset(ids, labels), batch_size=8),
                       groups=groups, shift_labels=True)  # fmt: skip
    plain = localize(Shifted(model), DataLoader(TensorDataset(ids, labels[:, 1:]), batch_size=8),
                     groups=groups)  # fmt: skip
    assert shifted.num_errors == plain.num_errors
    assert [(i, p - 1) for i, p in shifted.error_indices] == plain.error_indices
    for name, value in shifted.grad_norms.items():
        assert plain.grad_norms[name] == pytest.approx(value, rel=1e-5)
    assert shifted.specificity == pytest.approx(plain.specificity, rel=1e-4)


def _bert_classifier(num_labels=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=16, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def test_bert_with_dict_batches_matches_a_hand_computation_and_verifies():
    model = _bert_classifier()
    ids, _ = _tokens()
    mask = torch.ones_like(ids)
    mask[::3, -4:] = 0
    labels = torch.arange(EXAMPLES) % 3
    loader = DataLoader(DictDataset(input_ids=ids, attention_mask=mask, labels=labels),
                        batch_size=6)  # fmt: skip
    training = [m.training for m in model.modules()]
    found = localize(model, loader, groups=layer_groups(model, depth=3))
    assert [m.training for m in model.modules()] == training

    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    wrong = logits.argmax(1) != labels
    assert found.num_examples == EXAMPLES and found.num_errors == int(wrong.sum()) > 0
    assert found.error_indices == wrong.nonzero().flatten().tolist()
    loss = F.cross_entropy(logits[wrong], labels[wrong])
    expected = _group_norms_of_mean(model, loss, found.groups)
    for name, value in expected.items():
        assert found.grad_norms[name] == pytest.approx(value, rel=1e-4, abs=1e-7)

    truth, before = predict(model, loader)
    assert truth.tolist() == labels.tolist() and before.tolist() == logits.argmax(1).tolist()
    after = truth.clone()  # a perfect model: every error fixed
    check = verify(truth, before, after)
    assert check.fixed == int(wrong.sum()) and check.new == 0


def test_predict_and_verify_on_positions_skip_ignored_labels():
    model = _gpt2()
    ids, labels = _tokens()
    loader = DataLoader(TensorDataset(ids, labels), batch_size=5)
    truth, preds = predict(model, loader, shift_labels=True)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    target = labels[:, 1:]
    kept = target != -100
    assert truth.tolist() == target[kept].tolist()
    assert preds.tolist() == logits.argmax(-1)[kept].tolist()
    # verify takes [examples, positions] with -100 too, and drops those entries
    grid = torch.full_like(target, -1)
    grid[kept] = preds
    result = verify(target, grid, torch.where(kept, target, grid))
    assert result.num_examples == int(kept.sum())
    assert result.fixed == int((preds != truth).sum()) and result.new == 0


def test_diagnose_pairs_are_label_and_predicted_tokens():
    model = _gpt2()
    ids, labels = _tokens()
    loader = DataLoader(TensorDataset(ids, labels), batch_size=8)
    groups = layer_groups(model, depth=2)
    found = localize(model, loader, groups=groups, shift_labels=True)
    names = {i: f"tok{i}" for i in range(VOCAB)}
    result = diagnose(model, loader, found, top=3, class_names=names)
    counted = {}
    for t, p in zip(found.error_labels, found.error_predictions):
        counted[(t, p)] = counted.get((t, p), 0) + 1
    top = sorted(counted.items(), key=lambda item: (-item[1], item[0]))[:3]
    assert [((p.true, p.predicted), p.count) for p in result.pairs] == top
    assert result.pairs[0].true_name == f"tok{top[0][0][0]}"
    by_callable = diagnose(model, loader, found, top=1, class_names=lambda i: f"id{i}")
    assert by_callable.pairs[0].predicted_name == f"id{top[0][0][1]}"


def test_custom_loss_and_failures_for_multi_label_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(40, 6)
    targets = (torch.randn(40, 4) > 0).float()
    loader = DataLoader(TensorDataset(x, targets), batch_size=10)

    def loss_fn(outputs, labels):
        return F.binary_cross_entropy_with_logits(outputs, labels, reduction="none").sum(1)

    def failures(logits, labels):
        return ((logits > 0).float() != labels).any(dim=1)

    with pytest.raises(ValueError, match="pass failures="):
        localize(model, loader, loss_fn=loss_fn)
    found = localize(model, loader, loss_fn=loss_fn, failures=failures)
    with torch.no_grad():
        wrong = failures(model(x), targets)
    assert found.num_errors == int(wrong.sum()) > 0
    assert found.error_labels == [None] * found.num_errors
    loss = loss_fn(model(x[wrong]), targets[wrong]).mean()
    expected = _group_norms_of_mean(model, loss, found.groups)
    for name, value in expected.items():
        assert found.grad_norms[name] == pytest.approx(value, rel=1e-5)
    with pytest.raises(ValueError, match="diagnose needs class labels"):
        diagnose(model, loader, found)


def test_bad_task_input_raises_a_clear_error_and_changes_nothing():
    model = _gpt2()
    ids, labels = _tokens()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    model.train()

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return {"scores": self.linear(x)}

    with pytest.raises(ValueError, match=r"neither a tensor nor has \.logits"):
        localize(Opaque(), DataLoader(TensorDataset(torch.randn(4, 3), torch.zeros(4).long())))
    with pytest.raises(ValueError, match=r"labels of shape \(8, 9\) match no layout"):
        localize(model, DataLoader(TensorDataset(ids, labels[:, 1:]), batch_size=8))
    with pytest.raises(ValueError, match="removes every label"):
        localize(model, DataLoader(TensorDataset(ids, torch.full_like(ids, -100)), batch_size=8))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 23\)"):
        localize(model, DataLoader(TensorDataset(ids, ids + 50), batch_size=8))
    with pytest.raises(ValueError, match="shift_labels=True needs logits"):
        localize(_bert_classifier(), DataLoader(TensorDataset(ids, ids[:, 0] % 3)),
                 shift_labels=True)  # fmt: skip
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        localize(model, DataLoader(TensorDataset(ids, labels)), ignore_index=0.5)
    with pytest.raises(ValueError, match="removes every label"):
        verify([[-100, -100]], [[0, 1]], [[1, 1]])
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
