"""HF Trainer and Lightning callbacks flip PhysicsSGD's hybrid switch; wrapped optimizers unwrap."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dampopt import PhysicsSGD, physics_momentum
from dampopt.integrations import unwrap_optimizer

LR = 0.05  # passed explicitly: tests do not rely on PhysicsSGD's default lr


def _data(n=40, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(n, 6, generator=generator)
    return x, (x[:, 0] > 0).long()


def test_unwrap_optimizer_sees_through_accelerate_and_lightning_wrappers():
    optimizer = PhysicsSGD([nn.Parameter(torch.zeros(3))], lr=LR, switch_metric=0.5)
    assert unwrap_optimizer(optimizer) is optimizer
    wrapped = []
    accelerate = pytest.importorskip("accelerate")
    accelerate.Accelerator(cpu=True)  # AcceleratedOptimizer needs the accelerator state
    wrapped.append(accelerate.optimizer.AcceleratedOptimizer(optimizer))
    lightning = pytest.importorskip("lightning")
    wrapped.append(lightning.pytorch.core.optimizer.LightningOptimizer(optimizer))
    wrapped.append(lightning.pytorch.core.optimizer.LightningOptimizer(wrapped[0]))
    with pytest.raises(AttributeError):
        wrapped[0].observe(1.0)  # accelerate's wrapper does not forward PhysicsSGD's methods
    for outer in wrapped:
        assert unwrap_optimizer(outer) is optimizer
    assert not unwrap_optimizer(wrapped[0]).observe(0.1)
    assert unwrap_optimizer(wrapped[2]).observe(0.9) and optimizer.switched_at == 0
    with pytest.raises(TypeError, match="expected a torch optimizer, got list"):
        unwrap_optimizer([optimizer])


def _hf_run(tmp_path, switch_metric):
    transformers = pytest.importorskip("transformers")
    from dampopt.integrations.huggingface import DampoptCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=17, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=8, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 17, (40, 6), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": i, "labels": int(i[0] > 8)} for i in ids]

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) ==
                                   prediction.label_ids).mean())}  # fmt: skip

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4,
        per_device_eval_batch_size=20, eval_strategy="steps", eval_steps=5,
        save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    callback = DampoptCallback(metric="eval_accuracy")
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows[:20],
        compute_metrics=accuracy, callbacks=[callback],
        optimizer_cls_and_kwargs=(PhysicsSGD, {"lr": LR, "switch_metric": switch_metric}),
    )  # fmt: skip
    trainer.train()
    return trainer, callback


def test_hf_trainer_callback_flips_the_hybrid_switch_and_records_regimes(tmp_path):
    trainer, callback = _hf_run(tmp_path, switch_metric=0.0)  # any accuracy reaches it
    inner = callback.optimizer
    assert isinstance(inner, PhysicsSGD) and inner is not trainer.optimizer
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert inner.steps == 20
    assert [step for step, _, _ in callback.observed] == [5, 10, 15, 20]
    assert all(switched for _, _, switched in callback.observed)
    assert callback.switched_at == inner.switched_at == 5  # at the first evaluation
    assert inner.param_groups[0]["momentum"] == 0.9
    # 40 examples / 4 per step: two epochs, recorded with the momentum in effect at each end
    assert callback.monitor.mus == [0.9, 0.9] and len(callback.monitor.report().rows) == 2

    _, control = _hf_run(tmp_path, switch_metric=2.0)  # never reached: no switch
    assert control.switched_at is None and len(control.observed) == 4
    assert not any(switched for _, _, switched in control.observed)
    mu = physics_momentum(LR)  # 1 - 2 sqrt(lr), the physics momentum at the constant lr
    assert control.monitor.mus == pytest.approx([mu, mu]) and control.monitor.lrs == [LR, LR]


def _lightning_run(switch_metric):
    lightning = pytest.importorskip("lightning")
    from dampopt.integrations.lightning import DampoptCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, index):
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return PhysicsSGD(self.parameters(), lr=LR, switch_metric=switch_metric)

    torch.manual_seed(0)
    x, y = _data()
    callback = DampoptCallback(metric="val_acc")
    trainer = lightning.Trainer(
        max_steps=20, val_check_interval=5, limit_val_batches=1, num_sanity_val_steps=2,
        callbacks=[callback],
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = Module()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4),
                DataLoader(TensorDataset(x, y), batch_size=20))  # fmt: skip
    return module, callback


def test_lightning_callback_flips_the_hybrid_switch_and_records_regimes():
    module, callback = _lightning_run(switch_metric=0.0)
    assert isinstance(callback.optimizer, PhysicsSGD)
    assert type(module.optimizers()).__name__ == "LightningPhysicsSGD"  # the wrapper
    assert unwrap_optimizer(module.optimizers()) is callback.optimizer
    # sanity-check validation does not count; then one validation per 5 steps
    assert [step for step, _, _ in callback.observed] == [5, 10, 15, 20]
    assert callback.switched_at == 5 and callback.optimizer.param_groups[0]["momentum"] == 0.9
    assert callback.monitor.mus == [0.9, 0.9]

    _, control = _lightning_run(switch_metric=2.0)
    assert control.switched_at is None and len(control.observed) == 4


def test_timm_registry_builds_each_optimizer_by_name():
    timm = pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2

    import dampopt
    from dampopt.integrations.timm import register_optimizers

    names = register_optimizers()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    expected = {"physicssgd": dampopt.PhysicsSGD, "ikfad": dampopt.iKFAD,
                "cubicdampedsgd": dampopt.CubicDampedSGD, "cadam": dampopt.CADAM}  # fmt: skip
    assert sorted(names) == sorted(expected)
    assert set(expected) <= set(timm.optim.list_optimizers())
    for name, cls in expected.items():
        optimizer = create_optimizer_v2(model, opt=name, lr=0.01, weight_decay=1e-4,
                                        eps=1e-7 if name == "cadam" else None)  # fmt: skip
        assert type(optimizer) is cls
        assert optimizer.param_groups[0]["lr"] == 0.01
        # timm's weight-decay filter: biases and 1-d weights in a group without decay
        assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 1e-4]
        if name == "cadam":
            assert optimizer.param_groups[0]["eps"] == 1e-7
        if name == "physicssgd":
            assert optimizer.param_groups[0]["switch_momentum"] == 0.9  # timm's momentum
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
