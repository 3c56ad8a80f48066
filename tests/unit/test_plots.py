"""The plots without running anything: a simulated and a real run's times on separate axes,
the loss axis log when it spans a decade, and sweep.png's colours, legend and best star, read
back from the matplotlib figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba

from islands.metrics import plots
from islands.sweep import report, runner, space

VIRTUAL_TITLE, MEASURED_TITLE = "by virtual time (modelled)", "by measured time (wall clock)"


def _summary(name: str, clock: str | None, *, time_s: float, first_loss: float = 5.0) -> dict:
    """A run's summary with three eval points and two rounds; ``clock=None`` is an old
    summary written before the field existed."""
    losses = [first_loss, 2.0, 0.3]
    s = {"name": name, "workers": 2,
         "eval_curve": [{"step": 4 * k, "eval_loss": loss, "bytes_sent_per_worker": 100.0 * k,
                         "virtual_time_s": time_s * k / 2, "accuracy": 0.1 * k}
                        for k, loss in enumerate(losses)],
         "train_curve": [{"step": 4, "train_loss": 3.0}, {"step": 8, "train_loss": 1.0}]}
    return s if clock is None else {**s, "clock": clock}


@pytest.fixture
def mixed() -> list[dict]:
    return [_summary("sim", "virtual", time_s=31.5), _summary("real", "measured", time_s=0.5),
            _summary("old", None, time_s=20.0)]


def test_virtual_and_measured_runs_get_their_own_time_panels(mixed):
    drawn = plots.panels(mixed, ["sim", "real", "old"])
    assert list(drawn) == ["eval loss by steps", "by bytes on the wire", VIRTUAL_TITLE,
                           MEASURED_TITLE, "train loss per round", "accuracy by steps"]
    virtual, measured = drawn[VIRTUAL_TITLE], drawn[MEASURED_TITLE]
    assert [label for label, _, _ in virtual["series"]] == ["sim", "old"]  # no clock: virtual
    assert virtual["runs"] == [0, 2] and measured["runs"] == [1]
    assert [label for label, _, _ in measured["series"]] == ["real"]
    assert measured["series"][0][1][-1] == 0.5 and virtual["series"][0][1][-1] == 31.5
    assert "modelled" in virtual["x"] and "measured" in measured["x"]
    assert "virtual" not in measured["x"] and "(virtual)" not in " ".join(drawn)


@pytest.mark.parametrize("clock, title", [("virtual", VIRTUAL_TITLE),
                                          ("measured", MEASURED_TITLE)])
def test_runs_sharing_a_clock_get_one_time_panel(clock, title):
    drawn = plots.panels([_summary("a", clock, time_s=1.0), _summary("b", clock, time_s=2.0)],
                         ["a", "b"])
    assert [t for t in drawn if " time " in t] == [title]
    assert drawn[title]["runs"] == [0, 1]


@pytest.mark.parametrize("values, scale", [
    ([5.0, 0.25], "log"),  # 20x
    ([3.0, 1.0, 2.0], "linear"),  # 3x
    ([10.0, 1.0], "linear"),  # exactly a decade: not more than one
    ([5.0, 0.0, 0.1], "linear"),  # 0 has no place on a log axis
    ([5.0, -1.0, 0.1], "linear"),
    ([], "linear"),
    ([5.0, float("nan"), 0.25], "log"),  # a diverged point does not decide
])
def test_the_loss_axis_is_log_only_past_a_decade_of_positive_values(values, scale):
    assert plots.loss_scale(values) == scale


def test_a_virtual_and_a_measured_run_keep_their_colours_and_loss_goes_log(mixed):
    fig = plots.draw_runs(mixed, "mixed", ["sim", "real", "old"])
    try:
        axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        colours = {line.get_label(): line.get_color() for line in axes[VIRTUAL_TITLE].lines}
        assert colours == {"sim": "C0", "old": "C2"}  # "old" keeps its place after "real"
        assert [line.get_color() for line in axes[MEASURED_TITLE].lines] == ["C1"]
        for title in ("eval loss by steps", "by bytes on the wire", VIRTUAL_TITLE,
                      MEASURED_TITLE):  # 5.0 down to 0.3: more than a decade
            assert axes[title].get_yscale() == "log", title
        assert axes["train loss per round"].get_yscale() == "linear"  # 3.0 to 1.0
        assert axes["accuracy by steps"].get_yscale() == "linear"  # not a loss
    finally:
        plt.close(fig)


def test_plot_runs_writes_a_virtual_and_a_measured_run(mixed, tmp_path):
    path = plots.plot_runs(mixed[:2], tmp_path / "comparison.png", title="mixed")
    assert path == tmp_path / "comparison.png" and path.stat().st_size > 10_000


def _sweep_runs(tmp_path) -> list[runner.Run]:
    """Six points (more than C3, matplotlib's red, needs), one seed each: a baseline, a
    single worker that sends nothing, and ``b``, the best."""
    losses = {"baseline": 2.0, "workers=1": 2.4, "a": 2.1, "b": 1.6, "c": 1.9, "d": 2.2}
    runs = []
    for name, loss in losses.items():
        point = space.Point((f"x={name}",), name, baseline=name == "baseline")
        run = runner.Run(point, 0, tmp_path / name, [], {}, 2, 2)
        run.status, run.summary = "done", {
            "final_eval_loss": loss, "virtual_time_s": 1.0,
            "bytes_sent_per_worker": 0.0 if name == "workers=1" else 100.0,
            "eval_curve": [{"step": 0, "eval_loss": 5.0}, {"step": 8, "eval_loss": loss}]}
        runs.append(run)
    return runs


def _point_colours(ax) -> dict[str, tuple]:
    """Each errorbar's label and its marker's colour."""
    return {c.get_label(): to_rgba(c.lines[0].get_color()) for c in ax.containers}


def test_sweep_points_keep_one_colour_per_cell_and_the_best_is_a_star(tmp_path):
    runs = _sweep_runs(tmp_path)
    rows = report.point_rows(runs)
    fig = report.draw(rows, runs)
    try:
        left, mid, right = fig.axes
        by_point = _point_colours(mid)
        assert len(by_point) == 6 and len(set(by_point.values())) == 6
        assert _point_colours(left) == by_point
        assert {line.get_label(): to_rgba(line.get_color()) for line in right.lines} == by_point
        for c in left.containers:  # the error bars too
            assert to_rgba(c.lines[2][0].get_color()[0]) == by_point[c.get_label()]
        legend = [t.get_text() for t in mid.get_legend().get_texts()]
        assert legend == [*by_point, "★ best"]
        for ax in (left, mid):
            marks = {c.get_label(): c.lines[0] for c in ax.containers}
            best = marks.pop("★ x=b")
            assert best.get_marker() == "*" and best.get_markersize() >= 14
            assert to_rgba(best.get_markeredgecolor()) == to_rgba("black")
            assert {m.get_marker() for m in marks.values()} == {"o"}
    finally:
        plt.close(fig)


def test_more_points_than_the_colour_cycle_still_differ():
    assert len({to_rgba(c) for c in report.point_colours(14)}) == 14
    assert report.point_colours(3) == ["C0", "C1", "C2"]
