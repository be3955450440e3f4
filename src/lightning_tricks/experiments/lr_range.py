"""Turn an LR range test into a log range for the search ("a rough range to cross-validate in").

Rule: the upper end is the learning rate at the minimum of the smoothed loss (beyond it the loss
rises, so larger rates diverge); the lower end is ``span`` times smaller (default 100x, two decades),
but never below the first learning rate of the sweep. The proposal of
:class:`~lightning_tricks.callbacks.lr_finder.LRFinder` (``results.lr``) lies inside when it is
below the minimum, which all its rules ensure.

Example::

    finder = LRFinder(apply=False)
    trainer = Trainer(callbacks=[finder]); trainer.fit(model, dm)
    low, high = lr_search_range(finder.results)   # e.g. (0.003, 0.3)
"""

from __future__ import annotations

from lightning_tricks.callbacks.lr_finder import LRFinderResults


def lr_search_range(results: LRFinderResults, span: float = 100.0) -> tuple[float, float]:
    """``(low, high)`` for a log-uniform LR search from a finished range test.

    Raises:
        ValueError: When the test recorded fewer than two finite steps or ``span <= 1``.
    """
    if span <= 1:
        raise ValueError(f"span must be > 1 (the ratio high/low), got {span}")
    if len(results.lrs) < 2 or len(results.smoothed) != len(results.lrs):
        raise ValueError(
            f"The LR range test recorded {len(results.lrs)} finite steps; at least 2 are needed for a range."
            " Lower `min_lr` or raise `num_steps` of the LRFinder."
        )
    at_min = min(range(len(results.smoothed)), key=results.smoothed.__getitem__)
    high = results.lrs[max(at_min, 1)]
    low = max(results.lrs[0], high / span)
    return float(low), float(high)
