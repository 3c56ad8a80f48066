"""Aggregators: pure functions over stacked contributions shaped ``(n, numel)``.

Each takes ``stacked`` (n, numel) and optional ``weights`` (n,) and returns (numel,). The
butterfly all-reduce applies them shard by shard, so coordinate-wise rules cost no extra bytes.
Each registers its ``[aggregator]`` section by name beside its code (``MeanConfig``).

The robust rules (coordinate median, trimmed mean, Krum, Multi-Krum, Bulyan, CenteredClip,
FoolsGold) are functions too; their sections build a :class:`Rule` per worker, which clips
the rows first if asked, keeps the rule's state (CenteredClip's centers) and reports each
row's influence. Rules that compare whole contributions say so (``Rule.whole_vector``): the
engine all-gathers the rows for them.
"""

from islands.aggregators.centered_clip import CenteredClip, CenteredClipConfig, centered_clip
from islands.aggregators.clipping import clip_rows
from islands.aggregators.coordinate import (
    Median,
    MedianConfig,
    TrimmedMean,
    TrimmedMeanConfig,
    coordinate_median,
    trimmed_mean,
)
from islands.aggregators.krum import (
    Bulyan,
    BulyanConfig,
    Krum,
    KrumConfig,
    MultiKrum,
    MultiKrumConfig,
    bulyan,
    krum_scores,
    multi_krum,
)
from islands.aggregators.mean import Mean, MeanConfig, mean
from islands.aggregators.rule import Rule, coordinatewise
from islands.aggregators.similarity import FoolsGold, SybilConfig, foolsgold_weights, sybil

__all__ = ["Bulyan", "BulyanConfig", "CenteredClip", "CenteredClipConfig", "FoolsGold", "Krum",
           "KrumConfig", "Mean", "MeanConfig", "Median", "MedianConfig", "MultiKrum",
           "MultiKrumConfig", "Rule", "SybilConfig", "TrimmedMean", "TrimmedMeanConfig",
           "bulyan", "centered_clip", "clip_rows", "coordinate_median", "coordinatewise",
           "foolsgold_weights", "krum_scores", "mean", "multi_krum", "sybil", "trimmed_mean"]
