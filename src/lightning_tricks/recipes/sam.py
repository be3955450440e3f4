"""Sharpness-Aware Minimization (SAM, Foret et al. 2021) and its adaptive variant (ASAM, Kwon et al. 2021).

Hand-written because neither ``torch.optim`` nor ``timm.optim`` ships SAM (the usual reference is an
unpackaged repository, github.com/davda54/sam, whose update this follows).

One SAM step needs two gradients: ``g = grad L(w)``, then the gradient at the perturbed weights
``w + e`` with ``e = rho * g / ||g||`` (ASAM: ``e = rho * w^2 * g / ||w * g||``, norms over all
parameters); the base optimizer then updates ``w`` (not ``w + e``) with that second gradient. The
second gradient comes from calling the closure again, which is how Lightning's automatic optimization
already calls ``optimizer.step(closure)``: its closure runs ``training_step``, ``zero_grad`` and
``backward`` (and, through the precision plugin, ``on_before_optimizer_step`` and gradient clipping).

Example::

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = SAM(base, rho=0.05)

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_tricks.recipes.optim_wrappers import share_state


class SAM(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` so each step descends from the worst nearby point (radius ``rho``).

    Param groups, state and ``state_dict`` are the base optimizer's, so LR schedulers, checkpoints and
    code reading ``optimizer.state`` see one optimizer; ``sam_rho``/``sam_adaptive`` are keys of each
    group, prefixed so they never meet the base's own keys (Adadelta's ``rho``).
    :attr:`perturbed` is ``True`` while the closure runs at ``w + e``: a LightningModule can skip its
    metric updates there, so each step counts once.

    Args:
        base_optimizer: The optimizer that makes the update (SGD, AdamW, ...).
        rho: Radius of the neighbourhood, > 0 (the paper's default 0.05).
        adaptive: ASAM: scale the perturbation per weight by ``|w|`` (scale-invariant sharpness).

    Example::

        optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    """

    def __init__(
        self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False
    ) -> None:
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(
                f"optimizer.sam.rho must be a number > 0, got {rho!r}; e.g. optimizer.sam.rho=0.05"
            )
        if not isinstance(adaptive, bool):
            raise ValueError(f"optimizer.sam.adaptive must be true or false, got {adaptive!r}")
        self.base_optimizer = base_optimizer
        self.perturbed = False
        super().__init__(base_optimizer.param_groups, {"sam_rho": rho, "sam_adaptive": adaptive})
        self.param_groups = base_optimizer.param_groups
        self.defaults.update(base_optimizer.defaults)
        share_state(self, base_optimizer)

    @torch.no_grad()
    def _perturbation(self) -> dict[torch.Tensor, torch.Tensor]:
        """``e`` for each parameter with a gradient; the norm runs over all of them."""
        pairs = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not pairs:
            return {}
        device = pairs[0][1].device
        norms = [
            ((p.abs() * p.grad) if group["sam_adaptive"] else p.grad).norm(2).to(device) for group, p in pairs
        ]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        return {
            p: (p.pow(2) if group["sam_adaptive"] else 1.0)
            * p.grad
            * (group["sam_rho"] / (norm + 1e-12)).to(p)
            for group, p in pairs
        }

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step; ``closure`` must zero the gradients, compute the loss and call ``backward``."""
        if closure is None:
            raise RuntimeError(
                "SAM needs the closure that recomputes the loss (optimizer.step(closure)); Lightning's "
                "automatic optimization passes one, except under 16-bit AMP with a GradScaler (use "
                "trainer.precision=bf16-mixed or 32) and in manual optimization"
            )
        with torch.enable_grad():
            loss = closure()
        if loss is None:  # the step was skipped (training_step returned None)
            return None
        perturbation = self._perturbation()
        originals = {p: p.detach().clone() for p in perturbation}
        with torch.no_grad():
            for p, e in perturbation.items():
                p.add_(e)
        self.perturbed = True
        try:
            with torch.enable_grad():
                closure()
        finally:
            self.perturbed = False
            with torch.no_grad():  # back to w exactly (w + e - e would round)
                for p, original in originals.items():
                    p.copy_(original)
        self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:  # a checkpoint written without SAM lacks its keys
            group.setdefault("sam_rho", self.defaults["sam_rho"])
            group.setdefault("sam_adaptive", self.defaults["sam_adaptive"])
