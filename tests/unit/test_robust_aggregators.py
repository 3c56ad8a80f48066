"""The robust rules' sections and per-worker objects: validation names the field, each build
is a new object, CenteredClip carries its center per shard (and through a state dict), each
rule's influence on hand-made rows, and too few rows are refused with what is needed."""

from __future__ import annotations

import pytest
import torch

from islands.aggregators import (
    Bulyan,
    BulyanConfig,
    CenteredClip,
    CenteredClipConfig,
    FoolsGold,
    Krum,
    KrumConfig,
    Mean,
    MeanConfig,
    Median,
    MedianConfig,
    MultiKrum,
    MultiKrumConfig,
    Rule,
    SybilConfig,
    TrimmedMean,
    TrimmedMeanConfig,
    bulyan,
    centered_clip,
    clip_rows,
    foolsgold_weights,
    krum_scores,
    mean,
    multi_krum,
    trimmed_mean,
)
from islands.aggregators.coordinate import NETWORK_MAX_ROWS, BlockSorter, network
from islands.aggregators.rule import capped
from islands.core.config import from_dict
from islands.core.errors import ConfigError, IslandsWarning

CONFIGS = [MeanConfig(clip_norm=1.0), MedianConfig(), TrimmedMeanConfig(), KrumConfig(),
           MultiKrumConfig(), BulyanConfig(), CenteredClipConfig(), SybilConfig()]


@pytest.mark.parametrize("cls, field, value, fragment", [
    (TrimmedMeanConfig, "trim", 0.5, "aggregator.trim (0.5) must be in [0, 0.5)"),
    (TrimmedMeanConfig, "trim", -0.1, "aggregator.trim (-0.1) must be in [0, 0.5)"),
    (KrumConfig, "f", -1, "aggregator.f (-1) must be >= 0 for krum"),
    (MultiKrumConfig, "f", -2, "aggregator.f (-2) must be >= 0 for multi_krum"),
    (MultiKrumConfig, "m", 0, "aggregator.m (0) must be >= 1 for multi_krum"),
    (BulyanConfig, "f", -1, "4f + 3"),
    (CenteredClipConfig, "tau", 0.0, "aggregator.tau (0.0) must be > 0 for centered_clip"),
    (CenteredClipConfig, "iters", 0, "aggregator.iters (0) must be >= 1"),
    (MedianConfig, "clip_norm", 0.0, "aggregator.clip_norm (0.0) must be > 0 for median"),
    (SybilConfig, "clip_norm", -1.0, "aggregator.clip_norm (-1.0) must be > 0 for sybil"),
    (MeanConfig, "clip_norm", -1.0, "aggregator.clip_norm (-1.0) must be > 0 for mean"),
    (CenteredClipConfig, "clip_norm", 0, "or None for no clipping"),
])
def test_bad_values_name_the_field_the_value_and_the_rule(cls, field, value, fragment):
    with pytest.raises(ConfigError, match=f"aggregator.{field}") as e:
        cls(**{field: value})
    assert fragment in str(e.value)


def test_the_sections_load_from_a_config():
    cfg = from_dict({"aggregator": {"name": "centered_clip", "tau": 0.5, "iters": 2}})
    assert repr(cfg.aggregator.build()) == "CenteredClip(tau=0.5, iters=2)"
    with pytest.raises(ConfigError, match="aggregator.f .* does not read it"):
        from_dict({"aggregator": {"name": "median", "f": 2}})


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_each_build_is_a_new_rule(cfg):
    a, b = cfg.build(), cfg.build()
    assert isinstance(a, Rule) and a is not b


def test_the_plain_mean_builds_the_mean_function_itself():
    assert MeanConfig().build() is mean
    rule = MeanConfig(clip_norm=2.0).build()
    assert isinstance(rule, Mean) and repr(rule) == "Mean(clip_norm=2.0)"
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # the first row, norm 5, is clipped to 2
    assert torch.allclose(rule(x), torch.tensor([0.6, 1.3]))


def test_whole_vector_rules_and_reprs():
    whole = {type(c.build()).__name__: c.build().whole_vector for c in CONFIGS}
    assert whole == {"Mean": False, "Median": False, "TrimmedMean": False, "Krum": True,
                     "MultiKrum": True, "Bulyan": True, "CenteredClip": False,
                     "FoolsGold": True}
    assert [repr(c.build()) for c in CONFIGS[1:]] == [
        "Median()", "TrimmedMean(trim=0.25)", "Krum(f=1)", "MultiKrum(f=1, m=None)",
        "Bulyan(f=1)", "CenteredClip(tau=None, iters=3)", "FoolsGold()"]
    assert repr(Median(clip_norm=1.5)) == "Median(clip_norm=1.5)"


def test_breakdown_points():
    assert Median().breakdown(7) == 3 and Median().breakdown(8) == 3
    assert TrimmedMean(trim=0.25).breakdown(8) == 2
    assert TrimmedMean(trim=0.29).breakdown(100) == 29  # not 28 from 28.999999999999996
    assert Krum(f=2).breakdown(7) == 2 and MultiKrum(f=1).breakdown(5) == 1
    assert Bulyan(f=1).breakdown(7) == 1
    assert CenteredClip().breakdown(8) == 3
    assert FoolsGold().breakdown(8) == 0 and Mean().breakdown(8) == 0
    with pytest.raises(ValueError, match="krum with f = 2 needs n >= 7"):
        Krum(f=2).breakdown(6)
    with pytest.raises(ValueError, match="bulyan with f = 1 needs n >= 7"):
        Bulyan(f=1).breakdown(6)


@pytest.mark.parametrize("call, fragment", [
    (lambda x: multi_krum(x[:4], f=1, m=1), "krum with f = 1 needs n >= 5 rows .* n = 4"),
    (lambda x: multi_krum(x[:4], f=1, m=None), "multi_krum with f = 1 needs n >= 5"),
    (lambda x: multi_krum(x, f=1, m=6), r"m \(6\) must be in \[1, n - f\] = \[1, 5\]"),
    (lambda x: krum_scores(x, 2), "krum with f = 2 needs n >= 7 rows .* n = 6"),
    (lambda x: bulyan(x, f=1), "bulyan with f = 1 needs n >= 7 rows .* n = 6"),
    (lambda x: trimmed_mean(x, trim=0.5), r"trim \(0.5\) cuts b = .* = 3 of n = 6"),
    (lambda x: centered_clip(x, tau=0.0, iters=1), r"tau \(0.0\) must be > 0"),
])
def test_too_few_rows_are_refused_with_what_is_needed(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call(torch.randn(6, 3))


@pytest.mark.parametrize("rule, fit, pure", [
    (Krum(f=2), 1, lambda x, f: multi_krum(x, f=f, m=1)),
    (MultiKrum(f=2), 1, lambda x, f: multi_krum(x, f=f, m=None)),
    (MultiKrum(f=2, m=6), 1, lambda x, f: multi_krum(x, f=f, m=5)),  # m: at most n - f
    (Bulyan(f=1), 0, lambda x, f: bulyan(x, f=f)),
])
def test_a_rule_given_fewer_rows_than_its_f_needs_tolerates_what_they_allow(rule, fit, pure):
    """Workers banned mid-run leave 6 rows where f = 2 (Krum) or f = 1 (Bulyan) needs 7: the
    rule goes on with the largest f the rows allow, and says so, instead of ending the run."""
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    with pytest.warns(IslandsWarning, match=f"got 6 .* tolerates f = {fit}|averages 5"):
        got = rule(x)
    assert torch.equal(got, pure(x, fit))
    with pytest.raises(ValueError, match="needs n >= 7"):
        pure(x, rule.f)  # the pure functions still refuse: the rule chose the fallback


def test_two_rows_leave_krum_nothing_to_tolerate_and_a_rule_that_fits_is_silent(recwarn):
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(MultiKrum(f=0)(x), mean(x)) and torch.equal(Bulyan(f=0)(x), mean(x))
    assert torch.equal(Krum(f=0)(x), x[0])  # tied scores: the lower index
    Krum(f=1)(torch.randn(5, 5))  # exactly 2f + 3 rows
    assert not [w for w in recwarn if issubclass(w.category, IslandsWarning)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_one_row_is_returned_as_a_copy(cfg):
    rule, x = cfg.build(), torch.tensor([[1.0, -2.0, 3.0]]) / 10
    out = rule(x)
    assert torch.equal(out, x[0]) and out.data_ptr() != x.data_ptr()
    assert rule.influence.tolist() == [1.0]


def test_krum_influence_marks_the_selected_rows():
    # scores (two nearest, squared): 0: 1 + 4, 1: 1 + 1, 2: 1 + 4, 4: 4 + 9, 100: far
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [100.0, 0.0]])
    assert krum_scores(x, 1)[:4].tolist() == [5.0, 2.0, 5.0, 13.0]
    rule = Krum(f=1)
    assert torch.equal(rule(x), x[1])
    assert rule.influence.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    multi = MultiKrum(f=1)  # m = n - f = 4: the four near rows
    assert multi(x).tolist() == [1.75, 0.0]
    assert multi.influence.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_krum_ties_go_to_the_lower_row():
    x = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0]])
    rule = Krum(f=1)
    rule(x)
    assert rule.influence.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_trimmed_and_median_influence_count_the_kept_coordinates():
    # per column the sorted rows: column 0: 0 < 1 < 2 < 3; column 1: 3 < 2 < 1 < 0
    x = torch.tensor([[0.0, 9.0], [1.0, 8.0], [2.0, 7.0], [3.0, 6.0]])
    rule = TrimmedMean(trim=0.25)  # b = 1: keeps the two middle rows of each column
    assert rule(x).tolist() == [1.5, 7.5]
    assert rule.influence.tolist() == [0.0, 1.0, 1.0, 0.0]
    median = Median()  # even n: the two middle values, as the trimmed mean here
    assert median(x).tolist() == [1.5, 7.5] and median.influence.tolist() == [0, 1, 1, 0]
    y = torch.tensor([[0.0, 5.0], [1.0, 0.0], [2.0, 1.0]])  # odd n: the middle value only
    assert median(y).tolist() == [1.0, 1.0]
    assert median.influence.tolist() == [0.0, 0.5, 0.5]


def test_bulyan_influence_is_zero_for_rows_it_did_not_select():
    x = torch.cat([torch.linspace(-1, 1, 6)[:, None].expand(6, 4) + torch.arange(4) / 100,
                   torch.full((1, 4), 1e3)])
    rule = Bulyan(f=1)
    out = rule(x)
    assert out.abs().max() < 1 and rule.influence[-1] == 0.0
    assert ((rule.influence >= 0) & (rule.influence <= 1)).all()


def test_sybil_clones_get_weight_zero():
    clone = torch.tensor([1.0, 2.0, 0.0, 0.0])
    x = torch.stack([clone, clone, clone, torch.tensor([0.0, 0.0, 1.0, 0.0]),
                     torch.tensor([0.0, 0.0, 0.0, 1.0])])
    assert foolsgold_weights(x).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    rule = FoolsGold()
    assert torch.allclose(rule(x), torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert rule.influence.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    everyone_alike = clone.expand(4, 4)  # nothing to tell apart: the plain mean
    assert torch.equal(rule(everyone_alike), clone) and rule.influence.tolist() == [1.0] * 4


def test_centered_clip_influence_is_the_last_clip_factor():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0]])
    rule = CenteredClip(tau=1.0, iters=1)  # from the median (0, 0): the far row is at 4
    assert torch.allclose(rule(x), torch.tensor([0.25, 0.0]))  # its offset clipped to 1, / 4
    assert rule.influence.tolist() == [1.0, 1.0, 1.0, 0.25]


def test_centered_clip_carries_its_center_per_key():
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g) + 3
    rule = CenteredClip(tau=0.5, iters=1)
    a = rule(first, key=("pg", 0, 6))
    assert torch.equal(a, centered_clip(first, tau=0.5, iters=1))  # from the median
    a[:] = 99.0  # the caller owns the result; the kept center is a copy
    again = rule(second, key=("pg", 0, 6))
    assert torch.equal(again, centered_clip(second, tau=0.5, iters=1, center=
                                            centered_clip(first, tau=0.5, iters=1)))
    other = rule(second, key=("pg", 6, 6))  # another shard starts from its own median
    assert torch.equal(other, centered_clip(second, tau=0.5, iters=1))
    shorter = rule(second[:, :4], key=("pg", 0, 6))  # a center of another shape is not used
    assert torch.equal(shorter, centered_clip(second[:, :4], tau=0.5, iters=1))

    state = rule.state_dict()
    restored = CenteredClip(tau=0.5, iters=1)
    restored.load_state_dict({"centers": [(list(k) if isinstance(k, tuple) else k, v)
                                          for k, v in state["centers"]]})  # keys as JSON has
    assert torch.equal(restored(first, key=("pg", 6, 6)), rule(first, key=("pg", 6, 6)))
    assert Median().state_dict() == {}


def test_weights_count_in_centered_clip_and_the_mean_only():
    x = torch.tensor([[0.0], [1.0], [2.0]])
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert CenteredClip(tau=10.0, iters=5)(x, w).item() == pytest.approx(0.0, abs=1e-6)
    assert Mean(clip_norm=10.0)(x, w).item() == 0.0
    assert Median()(x, w).item() == 1.0  # weights ignored


def test_reports_are_taken_once():
    rule = TrimmedMean(trim=0.25)
    x = torch.randn(4, 10)
    rule(x, key=("pg", 0, 10))
    rule(x[:, :6], key=("pg", 10, 6))
    reports = rule.take_reports()
    assert [(k, numel) for k, numel, _ in reports] == [(("pg", 0, 10), 10), (("pg", 10, 6), 6)]
    assert all(i.dtype == torch.float64 and i.shape == (4,) for _, _, i in reports)
    assert rule.take_reports() == []


def test_clipping_applies_before_the_rule():
    x = torch.tensor([[30.0, 40.0], [0.3, 0.4], [0.6, 0.8]])
    assert torch.allclose(Median(clip_norm=0.5)(x), torch.tensor([0.3, 0.4]))
    assert torch.equal(clip_rows(x, 2.0)[1:], x[1:])  # rows within the bound: bit for bit
    with pytest.raises(ValueError, match="clip_norm"):
        clip_rows(x, 0.0)


@pytest.mark.parametrize("n", range(1, 15))
def test_the_sorting_network_sorts(n):
    """Every 0/1 column (the zero-one principle: then every column), and random ones."""
    columns = torch.arange(2 ** n)
    zero_one = ((columns[None, :] >> torch.arange(n)[:, None]) & 1).float()
    sorter = BlockSorter(n, range(n), zero_one)
    for block in (zero_one[:, :sorter.buffer.shape[1]], torch.randn(n, 100)):
        assert torch.equal(torch.stack(sorter.sort(block)), block.sort(dim=0).values)
    assert all(i < j for i, j in network(n))
    x = torch.randn(n, 300)
    for b in range((n + 1) // 2):  # the comparators the trimmed positions need, only
        rows = BlockSorter(n, range(b, n - b), x).sort(x)[b:n - b]
        assert torch.equal(torch.stack(rows), x.sort(dim=0).values[b:n - b])


def test_more_rows_than_the_network_sort_with_torch():
    x = torch.randn(NETWORK_MAX_ROWS + 3, 50, dtype=torch.float64)
    assert torch.allclose(trimmed_mean(x, trim=0.1), x.sort(dim=0).values[3:-3].mean(dim=0))


def test_a_robust_rule_counts_no_weight_above_the_median_and_the_mean_keeps_fedavgs():
    """One member claiming 1e9 samples counts as a typical member under CenteredClip (its
    result equals the one with the weight it would have had), while the mean follows it."""
    w = torch.tensor([3.0, 5.0, 4.0, 1e9], dtype=torch.float64)
    assert capped(w).tolist() == [3.0, 4.0, 4.0, 4.0]
    assert capped(torch.tensor([0.0, 2.0, 6.0], dtype=torch.float64)).tolist() == [0, 2, 2]
    rows = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    typical = torch.tensor([3.0, 5.0, 4.0, 4.0], dtype=torch.float64)
    assert torch.equal(CenteredClip()(rows, w), CenteredClip()(rows, typical))
    assert torch.allclose(Mean()(rows, w), rows[3], atol=1e-6)
