"""The per-worker object of a robust aggregation rule: optional row clipping, the rule, and
what the rule did (each row's influence).

The rules themselves are pure functions over stacked contributions (``coordinate``, ``krum``,
``centered_clip``, ``similarity``); a :class:`Rule` wraps one for the engine, which builds
one per worker from the ``[aggregator]`` section and calls it on every shard it aggregates.
The rules: Krum and Multi-Krum (Blanchard et al. 2017), the coordinate median and trimmed mean
(Yin et al. 2018), Bulyan (El Mhamdi et al. 2018), FoolsGold (Fung et al. 2020) and CenteredClip
(Karimireddy et al. 2021).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import torch

from islands.aggregators.clipping import clip_rows, first_of_clones


def check_rows(stacked: torch.Tensor, rule: str) -> None:
    """Raises ``ValueError`` unless ``stacked`` is a floating (n, numel) tensor with n >= 1."""
    if stacked.dim() != 2 or stacked.shape[0] < 1 or not stacked.is_floating_point():
        raise ValueError(f"{rule}: stacked ({tuple(stacked.shape)}, {stacked.dtype}) must be "
                         f"a floating (n, numel) tensor with n >= 1 rows")


def coordinatewise(rule) -> bool:
    """Whether each coordinate of ``rule``'s result depends only on the same coordinate of
    the rows (the plain and weighted mean, the coordinate median and trimmed mean, without
    row clipping or the clone filter, which read whole rows): a third party can then check
    any slice of an aggregate from the same slice of its inputs
    (:mod:`islands.runtime.evidence`)."""
    return (bool(getattr(rule, "coordinatewise", False))
            and getattr(rule, "clip_norm", None) is None and getattr(rule, "clones", None) is None)


def capped(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` with none above the median of the positive ones (the lower middle one for
    an even count): a robust rule's weights, where a forged or inflated weight counts as a
    typical member's and the others are unchanged."""
    positive = weights[weights > 0]
    if positive.numel() == 0:
        return weights
    return torch.minimum(weights, positive.median())


class Rule:
    """An aggregation rule for the engine: ``rule(stacked, weights, key=...) -> (numel,)``.

    Subclasses implement :meth:`_aggregate` (and :meth:`breakdown`); a subclass with state
    (:class:`~islands.aggregators.centered_clip.CenteredClip`'s centers) also overrides
    :meth:`state_dict` and :meth:`load_state_dict`.

    Attributes:
        whole_vector: the rule needs whole contributions (distances between rows), not shards:
            the engine all-gathers the rows instead of reducing shard by shard.
        influence: after each call, (n,) float64 in [0, 1]: how much each row counted,
            relative to a plain mean (1: fully); each rule says what it measures.

        caps_weights: the rule counts no row's weight above the median of the positive
            weights (:func:`capped`), so that one member claiming many samples cannot outweigh
            the rest (every robust rule; the mean keeps FedAvg's weights as they are).
        clones: the cosine similarity above which a row counts as a clone of an earlier
            one (a Sybil's identities sending one update, SybilWall's test): only the first
            of each group reaches the rule, the others get influence 0 (None: off). The
            engine sets it from ``aggregator.clones``. Per shard in the butterfly, clones are
            clones in every shard.

    Args:
        clip_norm: clip every row to this L2 norm before the rule (:func:`clip_rows`);
            None: no clipping.
    """

    whole_vector: ClassVar[bool] = False
    caps_weights: ClassVar[bool] = True
    # the rule carries state from call to call: another member cannot recompute its result
    stateful: ClassVar[bool] = False
    # each coordinate of the result reads only that coordinate of the rows (before clipping
    # and the clone filter: :func:`coordinatewise`)
    coordinatewise: ClassVar[bool] = False

    def __init__(self, *, clip_norm: float | None = None) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm ({clip_norm!r}) must be > 0, or None for no clipping")
        self.clip_norm = clip_norm
        self.clones: float | None = None
        self.influence: torch.Tensor | None = None
        self._reports: list[tuple[Hashable, int, torch.Tensor]] = []

    def __call__(self, stacked: torch.Tensor, weights: torch.Tensor | None = None, *,
                 key: Hashable = None) -> torch.Tensor:
        """Clips the rows (``clip_norm``), then aggregates them.

        Args:
            stacked: (n, numel) contributions in member order; read only.
            weights: (n,) float64 aggregation weights, or None; used only where a rule says.
            key: which shard this is (any hashable, such as ``(tag, offset, numel)``); a rule
                with state keeps it per key.

        Returns:
            (numel,) a new tensor.
        """
        out, influence = self._apply(stacked, weights, key)
        self.influence = influence
        self._reports.append((key, int(stacked.shape[1]), influence))
        return out

    def recompute(self, stacked: torch.Tensor, weights: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """What :meth:`__call__` returns for these rows, without recording a report (a
        verifier's recomputation of another member's aggregate); a stateful rule raises."""
        if self.stateful:
            raise ValueError(f"{type(self).__name__} carries state between calls: another "
                             "member cannot recompute its aggregate")
        return self._apply(stacked, weights, None)[0]

    def _apply(self, stacked: torch.Tensor, weights: torch.Tensor | None,
               key: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """Clones dropped, rows clipped, the rule: the result and every row's influence."""
        check_rows(stacked, type(self).__name__)
        n = stacked.shape[0]
        keep = (None if self.clones is None or n < 2
                else first_of_clones(stacked, self.clones).to(stacked.device))
        if keep is not None and bool(keep.all()):
            keep = None
        rows = stacked if keep is None else stacked[keep]
        if weights is not None and keep is not None:
            weights = weights[keep.to(weights.device)]
        if weights is not None and self.caps_weights:
            weights = capped(weights)
        rows = rows if self.clip_norm is None else clip_rows(rows, self.clip_norm)
        out, influence = self._aggregate(rows, weights, key)
        if keep is not None:
            full = torch.zeros(n, dtype=torch.float64)
            full[keep.cpu()] = influence.cpu()
            influence = full
        return out, influence

    def _aggregate(self, stacked: torch.Tensor, weights: torch.Tensor | None,
                   key: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """The result (numel,) and the influence (n,) float64 of one call."""
        raise NotImplementedError

    def breakdown(self, n: int) -> int:
        """The most Byzantine rows out of ``n`` the rule is documented to tolerate."""
        raise NotImplementedError

    def take_reports(self) -> list[tuple[Hashable, int, torch.Tensor]]:
        """``(key, numel, influence)`` of every call since the last take, oldest first; the
        list is cleared."""
        reports, self._reports = self._reports, []
        return reports

    def state_dict(self) -> dict:
        """What the rule carries between calls (nothing, unless a subclass says)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output."""

    def _clip_repr(self, sep: str = "") -> str:
        return "" if self.clip_norm is None else f"{sep}clip_norm={self.clip_norm}"
