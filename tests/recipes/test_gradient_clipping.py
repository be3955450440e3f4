"""Gradient clipping from YAML: Lightning's norm/value clipping and the recipe's adaptive clipping (AGC)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import quiet_trainer_kwargs

from lightning_tricks.cli import build_cli
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier
from lightning_tricks.recipes.clipping import GradientClippingConfig

CONFIGS = Path(__file__).parents[2] / "configs"
SHORT = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--model.init_args.model=small_cnn",
    "--data.init_args.image_size=8",
]


class GradientRecorder(L.Callback):
    """Gradients and weights as the optimizer receives them: before clipping (``on_before_optimizer_step``
    runs before Lightning's and the module's clipping) and after it (still in ``.grad`` after the step)."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def _grads(module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self._grads(pl_module))
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(self._grads(pl_module))


def _fit_from_yaml(tmp_path, *overrides: str) -> GradientRecorder:
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "digits.yaml"),
            *SHORT,
            f"--trainer.default_root_dir={tmp_path}",
            *overrides,
        ],
        run=False,
    )
    recorder = GradientRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    return recorder


def _total_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


@pytest.mark.parametrize("sam", [False, True])
def test_yaml_norm_clipping_bounds_the_gradient_the_optimizer_uses(tmp_path, sam: bool) -> None:
    threshold = 0.05
    extra = ["--model.init_args.optimizer.sam={rho: 0.05}"] if sam else []
    recorder = _fit_from_yaml(
        tmp_path, f"--trainer.gradient_clip_val={threshold}", "--trainer.gradient_clip_algorithm=norm", *extra
    )
    # with SAM the hook runs at w and at w + e each step; the last of a step is the gradient used
    before = recorder.before[1::2] if sam else recorder.before
    assert len(before) == len(recorder.after) == 3
    for raw, clipped in zip(before, recorder.after, strict=True):
        assert _total_norm(raw) > threshold  # the clipping had something to do
        assert _total_norm(clipped) == pytest.approx(threshold, rel=1e-4)
        if not sam:  # same direction, scaled by threshold / ||g||
            scale = threshold / _total_norm(raw)
            for name, g in raw.items():
                torch.testing.assert_close(clipped[name], g * scale, rtol=1e-4, atol=1e-8)


def test_yaml_value_clipping_bounds_every_gradient_entry(tmp_path) -> None:
    value = 1e-3
    recorder = _fit_from_yaml(
        tmp_path, f"--trainer.gradient_clip_val={value}", "--trainer.gradient_clip_algorithm=value"
    )
    for raw, clipped in zip(recorder.before, recorder.after, strict=True):
        assert max(float(g.abs().max()) for g in raw.values()) > value
        for name, g in raw.items():
            torch.testing.assert_close(clipped[name], g.clamp(-value, value), rtol=0, atol=0)


def test_yaml_agc_clips_each_unit_to_its_weight_norm_except_the_head(tmp_path) -> None:
    clip_factor, eps = 0.01, 1e-3
    recorder = _fit_from_yaml(
        tmp_path, f"--model.init_args.gradient_clipping={{mode: agc, clip_factor: {clip_factor}}}"
    )
    clipped_units = 0
    for raw, weights, clipped in zip(recorder.before, recorder.weights, recorder.after, strict=True):
        for name, g in raw.items():
            if name.startswith("net.classifier."):  # the final linear layer is left alone
                torch.testing.assert_close(clipped[name], g, rtol=0, atol=0)
                continue
            w = weights[name]
            # unit-wise norms: one per output row of a weight (all dims but the first), a vector as a whole
            dims = tuple(range(1, w.ndim)) if w.ndim > 1 else tuple(range(w.ndim))
            w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
            g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
            max_norm = clip_factor * torch.clamp(w_norm, min=eps)
            expected = torch.where(g_norm > max_norm, g * max_norm / g_norm, g)
            torch.testing.assert_close(clipped[name], expected, rtol=1e-5, atol=1e-9, msg=name)
            clipped_units += int((g_norm > max_norm).sum())
    assert clipped_units > 0


def test_agc_beside_lightning_clipping_is_refused_before_training(tmp_path) -> None:
    module = ImageClassifier("small_cnn", num_classes=10, in_channels=1, gradient_clipping={"mode": "agc"})
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), gradient_clip_val=1.0, max_steps=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"model.init_args.gradient_clipping.*gradient_clip_val=1.0.*keep one"
    ):
        trainer.fit(module, DigitsDataModule(batch_size=32, image_size=8))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"mode": "norm"},
            r"gradient_clipping.mode='norm' is Lightning's clipping: set trainer.gradient_clip_val",
        ),
        ({"mode": "abs"}, r"gradient_clipping.mode='abs' is unknown; valid: agc"),
        ({"clip_factor": 0.0}, r"gradient_clipping.clip_factor must be a number > 0, got 0.0"),
        ({"eps": -1.0}, r"gradient_clipping.eps must be a number > 0"),
    ],
)
def test_bad_clipping_settings_name_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientClippingConfig(**kwargs)
