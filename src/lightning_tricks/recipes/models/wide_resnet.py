"""Wide residual networks of Zagoruyko & Komodakis (2016), "Wide Residual Networks".

WRN-d-k: a 3x3 stem of 16 channels and three stages of ``n = (d - 4) / 6`` pre-activation blocks
with 16k, 32k and 64k channels; dropout sits between the two convolutions of every block.

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("wide_resnet", num_classes=10, depth=16, widen_factor=4, dropout=0.3)
"""

from __future__ import annotations

from lightning_tricks.recipes.models.layers import CONV_NORMS, check_choice, check_probability
from lightning_tricks.recipes.models.preact_resnet import _PreActNet
from lightning_tricks.recipes.models.registry import register_variant


class WideResNet(_PreActNet):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs.

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        depth: total depth; ``(depth - 4) % 6 == 0``, e.g. 16, 22, 28, 40.
        widen_factor: channel multiplier k.
        dropout: dropout probability between the convolutions of each block (as in the paper).
        head_dropout: dropout probability before the classifier.
        drop_connect: DropConnect probability on the classifier weights.
        norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
        drop_path: Stochastic depth rate of the last block, linearly less for earlier ones.
        drop_block: DropBlock probability after the last two stages.
        drop_block_size: DropBlock's square block side.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        head_dropout: float = 0.0,
        drop_connect: float = 0.0,
        norm: str = "batch",
        drop_path: float = 0.0,
        drop_block: float = 0.0,
        drop_block_size: int = 3,
    ) -> None:
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must satisfy (depth - 4) % 6 == 0 with depth >= 10, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        check_choice("norm", norm, CONV_NORMS)
        check_probability("dropout", dropout)
        check_probability("head_dropout", head_dropout)
        n = (depth - 4) // 6
        super().__init__(
            in_channels=in_channels,
            stem_width=16,
            stages=[(16 * widen_factor, n), (32 * widen_factor, n), (64 * widen_factor, n)],
            norm=norm,
            block_dropout=dropout,
            num_classes=num_classes,
            head_dropout=head_dropout,
            drop_connect=drop_connect,
            drop_path=drop_path,
            drop_block=drop_block,
            drop_block_size=drop_block_size,
        )


wide_resnet = register_variant(
    "wide_resnet",
    WideResNet,
    input_sizes=(32,),
    doc="""WRN-``depth``-``widen_factor`` (see :class:`WideResNet`); ``dropout`` acts inside the blocks.

    Example::

        create_model("wide_resnet", num_classes=100, depth=40, widen_factor=4, dropout=0.3)
    """,
)

wrn_28_10 = register_variant(
    "wrn_28_10",
    WideResNet,
    depth=28,
    widen_factor=10,
    input_sizes=(32,),
    doc="""WRN-28-10 (36.5M parameters); the paper trains it with ``dropout=0.3``.

    Example::

        create_model("wrn_28_10", num_classes=10, dropout=0.3)
    """,
)

wrn_16_8 = register_variant(
    "wrn_16_8",
    WideResNet,
    depth=16,
    widen_factor=8,
    input_sizes=(32,),
    doc="""WRN-16-8 (11M parameters).

    Example::

        create_model("wrn_16_8", num_classes=10, dropout=0.3)
    """,
)
