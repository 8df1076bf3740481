"""layer_groups(depth="auto") on the architectures people fine-tune (tiny, random-initialised)."""

import warnings

import pytest
import torch
from torch import nn

from dampopt.diagnostics import layer_groups, localize, resolve_groups, treat


def _ids(params):
    return [id(p) for p in params]


def _auto(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a good grouping does not warn
        return layer_groups(model, depth="auto")


def _check_partition(model, groups, root=None):
    """Every parameter in exactly one group, each group the parameters of its module."""
    root = model if root is None else root
    flat = [id(p) for ps in groups.values() for p in ps]
    assert sorted(flat) == sorted(_ids(model.parameters())) and len(flat) == len(set(flat))
    for name, params in groups.items():
        assert _ids(params) == _ids(root.get_submodule(name).parameters()), name


def test_auto_on_resnet18_is_the_papers_seven_groups_and_sees_through_wrappers():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    groups = _auto(model)
    assert list(groups) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert {k: _ids(v) for k, v in groups.items()} == {
        k: _ids(v) for k, v in layer_groups(model).items()
    }
    _check_partition(model, groups)
    for wrapped in (torch.compile(model), nn.DataParallel(model)):
        assert {k: _ids(v) for k, v in layer_groups(wrapped, depth="auto").items()} == {
            k: _ids(v) for k, v in groups.items()
        }


def _bert(cls="BertForSequenceClassification", layers=3):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=23, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return getattr(transformers, cls)(config)


def test_auto_on_hf_bert_and_gpt2_gives_one_group_per_block():
    transformers = pytest.importorskip("transformers")
    bert = _bert()
    groups = _auto(bert)
    blocks = [f"bert.encoder.layer.{i}" for i in range(3)]
    assert list(groups) == ["bert.embeddings", *blocks, "bert.pooler", "classifier"]
    _check_partition(bert, groups)
    # depth 3 names the same blocks (the README's statement), but splits the embeddings;
    # depth 1 is one group and warns
    assert [k for k in layer_groups(bert, depth=3) if ".layer." in k] == blocks
    with pytest.warns(UserWarning, match=r"only 2 group\(s\).*depth='auto'"):
        assert list(layer_groups(bert, depth=1)) == ["bert", "classifier"]
    assert list(layer_groups(bert)) == list(groups)  # "auto" is the default

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=23, n_positions=16, n_embd=32, n_layer=4, n_head=2))  # fmt: skip
    groups = _auto(gpt2)
    blocks = [f"transformer.h.{i}" for i in range(4)]
    # lm_head.weight is tied to transformer.wte.weight: counted once, in the embeddings
    assert list(groups) == ["transformer.wte", "transformer.wpe", *blocks, "transformer.ln_f"]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    _check_partition(gpt2, groups)
    assert list(layer_groups(gpt2, depth=2)) == list(groups)


def test_auto_on_timm_vit_and_convnext():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=4, num_classes=5)  # fmt: skip
    groups = _auto(vit)
    blocks = [f"blocks.{i}" for i in range(4)]
    assert list(groups) == ["cls_token", "pos_embed", "patch_embed", *blocks, "norm", "head"]
    assert _ids(groups["blocks.2"]) == _ids(vit.blocks[2].parameters())
    with pytest.warns(UserWarning, match="holds 9[0-9]% of the parameters"):
        layer_groups(vit, depth=1)  # the blocks are one group
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    groups = _auto(convnext)
    assert list(groups) == ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"]
    _check_partition(convnext, groups)


def test_auto_on_peft_lora_bert_puts_adapters_in_their_blocks():
    peft = pytest.importorskip("peft")
    base = _bert()
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    groups = _auto(model)
    blocks = [f"bert.encoder.layer.{i}" for i in range(3)]
    assert list(groups) == ["bert.embeddings", *blocks, "bert.pooler", "classifier"]
    _check_partition(model, groups, root=base)
    lora = base.bert.encoder.layer[1].attention.self.query.lora_A["default"].weight
    assert lora.requires_grad and id(lora) in _ids(groups["bert.encoder.layer.1"])
    assert _ids(resolve_groups(model, ["bert.encoder.layer.1"])["bert.encoder.layer.1"]) == _ids(
        groups["bert.encoder.layer.1"]
    )
    # localize on the peft model: gradients reach the frozen base weights and the adapters,
    # every block is a group, and the frozen flags come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 23, (12, 8), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        [{"input_ids": i, "labels": torch.tensor(k % 3)} for k, i in enumerate(ids)],
        batch_size=4,
    )
    found = localize(model, loader, groups=groups)
    assert list(found.grad_norms) == list(groups) and found.num_errors > 0
    assert all(found.grad_norms[name] > 0 for name in blocks)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # treat finds the groups by their base-model names on the peft model and trains only them
    flagged = found.problem_layers
    assert 0 < len(flagged) < len(groups)
    corrected, _ = treat(model, loader, layers=flagged, epochs=1, lr=0.05, seed=0)
    trained = {id(p) for name in flagged for p in groups[name]}
    after = dict(corrected.named_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, after[n])}
    assert changed and all(id(dict(model.named_parameters())[n]) in trained for n in changed)


def test_auto_warns_on_a_model_without_repeated_blocks_and_rejects_bad_depth():
    model = nn.Sequential(nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 3), nn.LayerNorm(3))
    with pytest.warns(UserWarning, match="'0' holds 9[0-9]% of the parameters"):
        groups = layer_groups(model, depth="auto")  # no container: depth 1
    assert list(groups) == ["0", "2", "3"]
    with pytest.raises(ValueError, match=r'depth must be an int >= 1 \(or depth="auto"\)'):
        layer_groups(model, depth="blocks")
