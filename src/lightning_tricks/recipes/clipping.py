"""Adaptive gradient clipping (AGC, Brock et al. 2021), the recipe's own gradient clipping.

Clipping by global norm or by value is Lightning's (``trainer.gradient_clip_val`` and
``trainer.gradient_clip_algorithm: norm | value``). AGC clips each unit (each output row of a weight; a
bias or gain as a whole) whose gradient norm exceeds ``clip_factor`` times the unit's weight norm
(floored at ``eps``)::

    g_i <- g_i * clip_factor * max(||w_i||, eps) / ||g_i||   if ||g_i|| > clip_factor * max(||w_i||, eps)

The clipping itself is ``timm.utils.adaptive_clip_grad`` (the ``timm`` extra). As in the paper and in
timm's ``agc`` clip mode, the final linear layer is not clipped unless ``exclude_head=False``.

Example (YAML)::

    model:
      init_args:
        gradient_clipping: {mode: agc, clip_factor: 0.01}
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lightning_tricks._extras import import_optional

#: Modes of the recipe's ``gradient_clipping``; norm and value clipping are the Trainer's.
CLIPPING_MODES: tuple[str, ...] = ("agc",)
_EXAMPLES = {"clip_factor": 0.01, "eps": 1e-3}


@dataclass(frozen=True)
class GradientClippingConfig:
    """Adaptive gradient clipping settings of :class:`~lightning_tricks.recipes.ImageClassifier`.

    Args:
        mode: ``"agc"`` (the only recipe-side mode: ``norm``/``value`` are ``trainer.gradient_clip_val``
            with ``trainer.gradient_clip_algorithm``).
        clip_factor: ``lambda`` of the paper, > 0 (0.01 for batch 4096 in the paper; larger for smaller
            batches).
        eps: Floor of the weight norm, > 0, so zero-initialised weights can still move.
        exclude_head: Leave the final linear classifier unclipped (the paper's and timm's choice).

    Example::

        GradientClippingConfig(mode="agc", clip_factor=0.01)
    """

    mode: str = "agc"
    clip_factor: float = 0.01
    eps: float = 1e-3
    exclude_head: bool = True

    def __post_init__(self) -> None:
        if self.mode in ("norm", "value"):
            raise ValueError(
                f"gradient_clipping.mode={self.mode!r} is Lightning's clipping: set "
                f"trainer.gradient_clip_val=1.0 and trainer.gradient_clip_algorithm={self.mode} instead, and "
                "remove model.init_args.gradient_clipping"
            )
        if self.mode not in CLIPPING_MODES:
            raise ValueError(
                f"gradient_clipping.mode={self.mode!r} is unknown; valid: {', '.join(CLIPPING_MODES)} "
                "(norm/value clipping: trainer.gradient_clip_val and trainer.gradient_clip_algorithm)"
            )
        for name in ("clip_factor", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"gradient_clipping.{name} must be a number > 0, got {value!r}; "
                    f"e.g. gradient_clipping.{name}={_EXAMPLES[name]}"
                )


def clip_adaptively(parameters: Iterable[torch.Tensor], config: GradientClippingConfig) -> None:
    """Apply AGC in place to the gradients of ``parameters`` (timm's ``adaptive_clip_grad``).

    Example::

        clip_adaptively(model.parameters(), GradientClippingConfig(clip_factor=0.01))
    """
    timm_utils = import_optional("timm.utils", "gradient_clipping.mode='agc'")
    timm_utils.adaptive_clip_grad(list(parameters), clip_factor=config.clip_factor, eps=config.eps)
