"""Muon on a model's hidden matrices and AdamW on the rest, as one ``torch.optim.Optimizer``.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) orthogonalizes each
matrix's momentum with a Newton-Schulz iteration; it is meant for the weights of hidden layers
only, so embeddings, the output head and every parameter of fewer than 2 dimensions stay on
AdamW. Run as each worker's inner optimizer under DiLoCo it is MuLoCo (Therien et al., 2025,
"MuLoCo: Muon is a practical inner optimizer for DiLoCo", arXiv:2505.23725):
``inner.optimizer = "muon"`` (:func:`islands.engine.build.inner_optimizer` builds it).

:class:`MuonAdamW` delegates to ``torch.optim.Muon`` and ``torch.optim.AdamW``, which share its
param group dicts and its state, so it is a plain optimizer to everything else: one
``state_dict`` keyed by integer ids over its groups, ``zero_grad``, and an lr scheduler that
scales both parts. :func:`hidden_matrices` is the rule that picks Muon's parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates: the weights of the model's ``nn.Linear`` layers (a
    subclass counts), except the last ``nn.Linear`` registered (the output head or classifier)
    and a weight shared with an ``nn.Embedding``/``nn.EmbeddingBag`` (a tied head). Frozen
    weights are left out; a weight shared by several layers appears once, in
    ``model.parameters()`` order.

    Why by layer type and not by shape: a 2-D parameter is not always a hidden layer (a
    positional table held as a bare ``nn.Parameter``, an embedding), while an ``nn.Linear``
    inside the model always maps hidden features. What this misses stays on AdamW, which is
    always safe: convolution kernels (``torch.optim.Muon`` takes 2-D parameters only), matrices
    held as bare parameters (``nn.MultiheadAttention``'s ``in_proj_weight``), and a hidden
    ``nn.Linear`` registered after the head. A model's first ``nn.Linear`` counts as hidden.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return []
    shared = {id(m.weight) for m in model.modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    shared.add(id(linears[-1].weight))
    hidden = {id(m.weight) for m in linears if m.weight.dim() == 2} - shared
    return [p for p in model.parameters() if id(p) in hidden and p.requires_grad]


class MuonAdamW(torch.optim.Optimizer):
    """Muon on ``muon_params`` and AdamW on ``adamw_params``, as one optimizer.

    Its param groups are Muon's groups, then AdamW's; each carries ``"optimizer"``
    (``"muon"`` or ``"adamw"``) and the settings of that optimizer. ``step`` runs an internal
    ``torch.optim.Muon`` and ``torch.optim.AdamW`` that hold these same group dicts and this
    optimizer's ``state``, so one step equals one step of each alone, and ``state_dict``,
    ``load_state_dict`` and ``zero_grad`` are the base class's.

    Args:
        muon_params: 2-D parameters, or param group dicts of them, for Muon (the hidden
            matrices: :func:`hidden_matrices`).
        adamw_params: parameters, or param group dicts, for AdamW (everything else).
        lr: learning rate of both parts (a group may set its own).
        weight_decay: decoupled weight decay of both parts, ``p *= 1 - lr * weight_decay``
            (a group may set its own, e.g. 0 for biases and norms).
        betas: AdamW's betas.
        eps: AdamW's epsilon.
        momentum: Muon's momentum.
        nesterov: Muon's Nesterov momentum.
        ns_steps: Muon's Newton-Schulz iterations.
        adjust_lr_fn: how Muon scales ``lr`` by a matrix's shape. The default,
            ``"match_rms_adamw"`` (Liu et al., 2025, "Muon is Scalable for LLM Training",
            arXiv:2502.16982), scales it by ``0.2 * sqrt(max(rows, cols))`` so Muon's update
            has AdamW's RMS and one lr suits both parts; ``"original"`` is Keller Jordan's
            ``sqrt(max(1, rows / cols))``, which wants a Muon lr about 10x AdamW's.

    Raises:
        ValueError: a Muon parameter is not 2-D, or both lists are empty.
    """

    def __init__(self, muon_params: Iterable[Any], adamw_params: Iterable[Any], *,
                 lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: str = "match_rms_adamw") -> None:
        muon, adamw = _groups(muon_params, "muon"), _groups(adamw_params, "adamw")
        super().__init__(muon + adamw, {"lr": lr, "weight_decay": weight_decay})
        # the parts fill their own defaults into these same dicts (lr and weight decay are
        # already there); a part with no group is not built (Muon refuses an empty list)
        self._parts: dict[str, torch.optim.Optimizer] = {}
        if muon:
            self._parts["muon"] = torch.optim.Muon(
                muon, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        if adamw:
            self._parts["adamw"] = torch.optim.AdamW(adamw, lr=lr, weight_decay=weight_decay,
                                                     betas=betas, eps=eps)
        self._bind()

    def _bind(self) -> None:
        """Points each part at this optimizer's current groups and state (``load_state_dict``
        replaces both with new objects)."""
        for name, part in self._parts.items():
            part.__setstate__({"state": self.state, "param_groups": [
                g for g in self.param_groups if g["optimizer"] == name]})

    def __getstate__(self) -> dict[str, Any]:
        # the base class pickles defaults, state and groups only: a deepcopy would lose the parts
        return {**super().__getstate__(), "_parts": self._parts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # load_state_dict, unpickling and deepcopy come here
        self._bind()

    @torch.no_grad()
    def step(self, closure=None):
        """Steps Muon on its groups, then AdamW on its groups.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self._parts.values():
            part.step()
        return loss


def _groups(params: Iterable[Any], name: str) -> list[dict[str, Any]]:
    """``params`` as param group dicts tagged ``"optimizer": name``."""
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    if not items:
        return []
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    return [{**g, "optimizer": name} for g in items]
