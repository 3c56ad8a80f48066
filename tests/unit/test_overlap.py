"""The simulator's timeline clock and overlapped DiLoCo (``algorithm.overlap``)."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import pytest
import torch

from islands.collectives.butterfly import Group
from islands.core.errors import CommError, ConfigError
from islands.runtime.state import digest
from islands.sim import runner
from islands.sim.runner import Simulation, _EveryRound
from islands.transports.base import ThreadedFlight
from islands.transports.sim import SimTransport, VirtualClock
from tests.conftest import tiny_config

REFERENCE = json.loads((Path(__file__).parent / "data" / "blocking_reference.json").read_text())


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_blocking_algorithms_keep_the_releases_virtual_times_and_losses(case):
    ref = REFERENCE[case]
    s = Simulation(tiny_config("workers=3", "steps=12", "eval_every=6", *ref["overrides"])).run()
    for key, value in ref.items():
        if key == "final_eval_loss":  # the math library's kernels differ from one CPU to
            # another and round differently: the same computation, not the same last bits
            assert s[key] == pytest.approx(value, rel=1e-6, abs=0), key
        elif key != "overrides":  # the clock and the bytes: exact on any machine
            assert s[key] == value, key
    assert s["comm_hidden_s_by_worker"] == [0.0] * 3  # nothing overlaps


def test_a_background_exchange_is_hidden_by_compute_and_exposed_beyond_it():
    clock = VirtualClock(2)
    clock.compute(0, 1.0)
    clock.compute(1, 2.0)
    with clock.background() as flight:
        clock.barrier((0, 1), 3.0)  # starts when both are there (2.0), ends at 5.0
        clock.barrier((0, 1), 1.0)  # the second phase waits for the links: ends at 6.0
    assert clock.now == [1.0, 2.0] and clock.link_free == [6.0, 6.0]
    clock.compute(0, 7.0)  # worker 0 computes past the exchange's end; worker 1 does not
    clock.compute(1, 1.0)
    clock.settle(flight)
    assert clock.now == [8.0, 6.0]
    assert clock.hidden_s == [4.0, 1.0] and clock.comm_s == [0.0, 3.0]
    # a blocking exchange after it waits for the links too, and is all exposed
    clock.barrier((0, 1), 0.5)
    assert clock.now == [8.5, 8.5] and clock.comm_s == [0.5, 3.5]


def _sim(*sets):
    sim = Simulation(tiny_config("workers=3", "steps=16", "eval_every=100",
                                 "algorithm.name=diloco", "algorithm.sync_every=4", *sets))
    summary = sim.run()
    return sim, summary


@pytest.mark.parametrize("overlap", ["delayed", "eager"])
def test_one_worker_with_a_plain_outer_step_trains_as_blocking(overlap):
    """One worker, outer SGD at lr 1: every round's outer step is the round's own drift, so a
    one-round-late outer step changes nothing when the next round starts from the worker's
    own drift on top of the global state (the trajectory is plain local training)."""
    plain = ["workers=1", "outer.lr=1.0", "outer.momentum=0.0", "outer.nesterov=false"]
    blocking, _ = _sim(*plain)
    overlapped, _ = _sim(*plain, f"algorithm.overlap={overlap}")
    torch.testing.assert_close(overlapped.final_params, blocking.final_params, rtol=0, atol=1e-5)


def _globals_after(rounds: int, *sets) -> torch.Tensor:
    """Worker 0's global state after the first ``rounds`` rounds, driven by the engine's own
    round steps (begin, train, finish)."""
    sim = Simulation(tiny_config("workers=3", "steps=12", "eval_every=100",
                                 "algorithm.name=diloco", "algorithm.sync_every=4", *sets))
    engine = sim.build()
    driver = _EveryRound(Group(engine.transport, (0, 1, 2)))
    for _ in range(rounds):
        plan = engine.begin(driver)
        engine.finish(driver, plan, engine.train(plan.round, plan.participants))
    return engine.algorithm.global_state(sim.workers[0]).clone()


def test_delayed_applies_each_average_one_round_late():
    """Round 0 trains alike; blocking applies its average at the end of round 0, delayed at
    the end of round 1: delayed's global state after two rounds is blocking's after one."""
    blocking = _globals_after(1)
    assert torch.equal(_globals_after(2, "algorithm.overlap=delayed"), blocking)
    assert torch.equal(_globals_after(2, "algorithm.overlap=eager"), blocking)
    assert not torch.equal(_globals_after(1, "algorithm.overlap=delayed"), blocking)


@pytest.mark.parametrize("outer", [["outer.momentum=0.6"],
                                   ["outer.momentum=0.0", "outer.nesterov=false"],
                                   ["outer.momentum=0.5", "outer.nesterov=false",
                                    "outer.kwargs={weight_decay = 0.1}"]])
def test_eager_share_starts_each_round_where_the_papers_recursion_puts_each_worker(outer):
    """Kale et al.'s eager update: worker m steps its own outer SGD with ``Δ̃_m(t) = Δ_m(t) / M
    + Σ_{k≠m} Δ_k(t-1) / M``, its fresh pseudo-gradient's share mixed with the others' one
    round old. Each round's start here (the settled state plus the worker's private
    difference) is that recursion, run in the test with a torch SGD per worker on the
    pseudo-gradients each worker sent."""
    lr, n, rounds = 0.7, 3, 4
    sim = Simulation(tiny_config(f"workers={n}", "steps=16", "eval_every=100",
                                 "algorithm.name=diloco", "algorithm.sync_every=4",
                                 "algorithm.overlap=eager", "algorithm.eager=share",
                                 f"outer.lr={lr}", *outer))
    engine = sim.build()
    sent: list[dict[int, torch.Tensor]] = []
    contribute = engine.algorithm.contribute

    def recording(worker, observers=()):
        plan = contribute(worker, observers)
        if not sent or worker.id in sent[-1]:
            sent.append({})
        sent[-1][worker.id] = plan[0].tensor.clone()
        return plan

    engine.algorithm.contribute = recording
    driver = _EveryRound(Group(engine.transport, tuple(range(n))))
    paper = {w.id: torch.nn.Parameter(w.flat_params().clone()) for w in sim.workers}
    opts = {m: type(sim.workers[0].outer)([p], **sim.workers[0].outer.defaults)
            for m, p in paper.items()}
    for t in range(rounds - 1):  # the last round waits for its own average: no eager step
        plan = engine.begin(driver)
        engine.finish(driver, plan, engine.train(plan.round, plan.participants))
        old = sent[t - 1] if t else {m: torch.zeros_like(paper[m]) for m in paper}
        for m, p in paper.items():
            p.grad = sent[t][m] / n + sum(old[k] for k in paper if k != m) / n
            opts[m].step()
        for w in sim.workers:  # where the next round starts
            torch.testing.assert_close(w.flat_params(), paper[w.id].detach(), rtol=0,
                                       atol=1e-6)
    assert len(sent) == rounds - 1
    assert not torch.equal(sim.workers[0].flat_params(), sim.workers[1].flat_params())


def test_eager_share_needs_an_sgd_outer_optimizer():
    with pytest.raises(ConfigError, match="algorithm.eager.*outer.optimizer = 'sgd'"):
        Simulation(tiny_config("algorithm.name=diloco", "algorithm.overlap=eager",
                               "algorithm.eager=share", "outer.optimizer=adam",
                               "outer.momentum=0.0", "outer.nesterov=false"))


def test_overlap_hides_the_sync_behind_the_next_round():
    """A link slow enough that blocking DiLoCo waits for it: overlapped, each round's sync
    crosses it while the next round trains (only the last one is exposed); every worker ends
    with one global state, and the loss stays near blocking's."""
    slow = ["network.bandwidth_bps=5e6", "network.latency_s=0.05", "compute.step_time_s=0.1"]
    _, blocking = _sim(*slow)
    for overlap in ("delayed", "eager"):
        sim, s = _sim(*slow, f"algorithm.overlap={overlap}")
        assert s["virtual_time_s"] < blocking["virtual_time_s"]
        assert s["compute_utilization"] > blocking["compute_utilization"]
        assert min(s["comm_hidden_s_by_worker"]) > 0
        # the exposed part: the last round's sync (the first three were hidden)
        assert max(s["comm_exposed_s_by_worker"]) < blocking["comm_exposed_s_by_worker"][0] / 2
        assert s["bytes_sent_per_worker"] == blocking["bytes_sent_per_worker"]
        first = sim.shared_states[0]
        assert all(torch.equal(first[k], other[k]) for other in sim.shared_states[1:]
                   for k in first)
        assert abs(s["final_eval_loss"] / blocking["final_eval_loss"] - 1) < 0.05, overlap


def test_overlap_is_checked_and_runs_on_real_processes_too():
    with pytest.raises(ConfigError, match="algorithm.overlap"):
        tiny_config("algorithm.name=diloco", "algorithm.overlap=later")
    with pytest.raises(ConfigError, match="algorithm.eager.*'whole', 'share'"):
        tiny_config("algorithm.name=diloco", "algorithm.overlap=eager", "algorithm.eager=half")
    from islands.runtime.member import refuse_simulator_only

    for overlap in ("none", "delayed", "eager"):
        refuse_simulator_only(tiny_config("algorithm.name=diloco",
                                          f"algorithm.overlap={overlap}"))


def test_a_threaded_flight_runs_its_work_aside_and_settles_with_its_result_or_error():
    started, release = threading.Event(), threading.Event()

    def work():
        started.set()
        release.wait(5)
        return threading.current_thread().name

    flight = ThreadedFlight()
    flight.run(work)
    assert started.wait(5)  # running while this thread goes on
    release.set()
    assert flight.settle() == "sync in flight"
    ran_s, waited_s = flight.timing()
    assert ran_s > 0 and waited_s >= 0  # measured: the work blocked until released
    failing = ThreadedFlight()
    failing.run(lambda: (_ for _ in ()).throw(CommError("peer gone")))
    with pytest.raises(CommError, match="peer gone"):
        failing.settle()


class _ThreadedSim(SimTransport):
    """The simulator's transport with a real transport's background: syncs on a thread."""

    @contextlib.contextmanager
    def in_background(self):
        yield ThreadedFlight()


@pytest.mark.parametrize("overlap", ["delayed", "eager"])
def test_a_sync_in_flight_on_a_thread_ends_at_the_same_parameters(overlap, monkeypatch):
    """The engine's overlapped syncs run on a thread (as over a real transport) while the
    next round trains: the same global state as when the simulator issues them in place."""
    sets = [f"algorithm.overlap={overlap}", "outer.momentum=0.6"]
    inline, _ = _sim(*sets)
    monkeypatch.setattr(runner, "SimTransport", _ThreadedSim)
    threaded, summary = _sim(*sets)
    assert torch.equal(threaded.final_params, inline.final_params)
    assert len({digest(s) for s in threaded.shared_states}) == 1


# --- Streaming DiLoCo ---------------------------------------------------------------------

def test_fragments_are_equal_ranges_of_the_flat_parameters():
    from islands.algorithms.streaming import fragment_bounds

    assert fragment_bounds(22, 2) == [(0, 11), (11, 22)]
    assert fragment_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert fragment_bounds(8, 1) == [(0, 8)]
    with pytest.raises(ValueError, match="fragments"):
        fragment_bounds(2, 3)


def test_one_fragment_synced_at_once_without_mixing_is_diloco():
    streaming, s = _sim("algorithm.name=streaming_diloco", "algorithm.fragments=1",
                        "algorithm.tau=0", "algorithm.alpha=0.0")
    diloco, d = _sim()
    assert torch.equal(streaming.final_params, diloco.final_params)
    assert s["virtual_time_s"] == d["virtual_time_s"]
    assert s["bytes_sent_per_worker"] == d["bytes_sent_per_worker"]


def test_streaming_sends_a_fragment_per_sync_and_hides_it_behind_tau_steps():
    """Rounds of H / fragments steps, each syncing one fragment: the peak bytes of a round
    are the largest fragment's share of DiLoCo's (plus headers), the total is DiLoCo's; a
    link slow enough to be waited for is hidden behind the tau steps."""

    slow = ["network.bandwidth_bps=5e6", "network.latency_s=0.05", "compute.step_time_s=0.1",
            "algorithm.sync_every=8"]
    diloco, d = _sim(*slow)
    sim, s = _sim(*slow, "algorithm.name=streaming_diloco", "algorithm.fragments=2",
                  "algorithm.tau=4")
    headers = 16 * 2 * 2  # a message header to each of the 2 peers, in both phases
    assert s["peak_round_bytes_sent"] <= d["peak_round_bytes_sent"] / 2 + headers
    # each fragment synced every H steps: 16 steps, H = 8: twice, as DiLoCo's whole vector
    assert abs(s["bytes_sent_per_worker"] / d["bytes_sent_per_worker"] - 1) < 0.01
    assert min(s["comm_hidden_s_by_worker"]) > 0
    assert s["compute_utilization"] > d["compute_utilization"]
    first = sim.shared_states[0]
    assert all(torch.equal(first[k], other[k]) for other in sim.shared_states[1:]
               for k in first)


@pytest.mark.parametrize("sets, key", [
    (["algorithm.sync_every=10", "algorithm.fragments=3"], "algorithm.sync_every"),
    (["algorithm.sync_every=10", "algorithm.fragments=2", "algorithm.tau=6"], "algorithm.tau"),
    (["algorithm.alpha=1.5"], "algorithm.alpha"),
    (["outer.lr=[[0, 0.1], [4, 0.7]]"], "outer.lr"),
])
def test_streaming_settings_are_checked(sets, key):
    with pytest.raises(ConfigError, match=key):
        Simulation(tiny_config("algorithm.name=streaming_diloco", *sets))


def test_streaming_runs_on_real_processes_and_a_fault_plan_does_not():
    from islands.runtime.member import refuse_simulator_only

    refuse_simulator_only(tiny_config("algorithm.name=streaming_diloco"))
    with pytest.raises(ConfigError, match=r"\[\[faults\]\].*remove it"):
        refuse_simulator_only(tiny_config("algorithm.name=streaming_diloco",
                                          'faults=[{kind = "crash", worker = 1, round = 2}]'))


def test_a_streaming_sync_in_flight_on_a_thread_ends_at_the_same_parameters(monkeypatch):
    """Streaming's fragments land tau inner steps after they are issued: on a thread (as
    over a real transport) the same global state as issued in place."""
    sets = ["algorithm.name=streaming_diloco", "algorithm.fragments=2", "algorithm.tau=1"]
    inline, _ = _sim(*sets)
    monkeypatch.setattr(runner, "SimTransport", _ThreadedSim)
    threaded, _ = _sim(*sets)
    assert torch.equal(threaded.final_params, inline.final_params)


def test_a_streaming_workers_shared_state_loads_into_another():
    """Every fragment's global parameters and outer state round-trip through
    ``load_shared_state`` (what a joiner or a checkpoint would install)."""
    trained, _ = _sim("algorithm.name=streaming_diloco", "algorithm.fragments=2",
                      "algorithm.tau=1")
    fresh = Simulation(tiny_config("workers=3", "steps=16", "eval_every=100",
                                   "algorithm.name=streaming_diloco", "algorithm.sync_every=4",
                                   "algorithm.fragments=2", "algorithm.tau=1"))
    algorithm = fresh.build().algorithm
    w, state = fresh.workers[1], trained.shared_states[0]
    assert not torch.equal(algorithm.shared_state(w)["global_params"], state["global_params"])
    algorithm.load_shared_state(w, state)
    mine = algorithm.shared_state(w)
    assert mine.keys() == state.keys() and any(k.startswith("outer/1/") for k in mine)
    assert all(torch.equal(mine[k], state[k]) for k in state)
    assert torch.equal(w.flat_params(), state["global_params"])
