"""Byzantine workers in the simulator (``[attack]``): what each attack sends, that a provable
offence (NaN, a forged weight) bans its sender and not its victims, the ban rule on the robust
rules' influence, and per-worker statistics in the rows; asserted on state, never on time."""

from __future__ import annotations

import json

import pytest
import torch

from islands.algorithms import Contribution
from islands.core.config import from_dict
from islands.core.errors import ConfigError, IslandsWarning
from islands.core.sections import AttackConfig
from islands.engine.attacks import Attack, alie_z
from islands.runtime.member import refuse_simulator_only
from islands.sim.runner import Simulation
from tests.conftest import tiny_config


def _sim(*sets, workers=5, out_dir=None):
    sim = Simulation(tiny_config(f"workers={workers}", "steps=24", "eval_every=100",
                                 "algorithm.name=diloco", "algorithm.sync_every=4", *sets),
                     out_dir=out_dir)
    return sim, sim.run()


def _plans(rows: dict[int, list[float]]) -> dict[int, list[Contribution]]:
    return {w: [Contribution(torch.tensor(v), tag="pseudo-gradient")] for w, v in rows.items()}


def _attack(name, attackers=1, workers=3, **kw) -> Attack:
    return Attack(AttackConfig(name=name, attackers=attackers, **kw), workers, classes=4)


def test_the_attackers_are_the_highest_ids_or_those_named():
    assert AttackConfig(name="noise", attackers=2).ids(8) == (6, 7)
    assert AttackConfig(name="noise", attackers=(0, 3)).ids(8) == (0, 3)
    assert AttackConfig(name="none", attackers=3).ids(8) == ()
    with pytest.raises(ConfigError, match="attack.attackers.*honest"):
        from_dict({"workers": 2, "attack": {"name": "noise", "attackers": 2}})
    with pytest.raises(ConfigError, match="attack.name.*sign_flip"):
        from_dict({"attack": {"name": "flip"}})


@pytest.mark.parametrize("name, expect", [
    ("sign_flip", [-100.0, -200.0]),      # -10 x its own
    ("ipm", [-1.0, -1.0]),                # -0.5 x the honest mean (2, 2)
])
def test_what_an_attacker_sends(name, expect):
    plans = _plans({0: [1.0, 1.0], 1: [3.0, 3.0], 2: [10.0, 20.0]})
    _attack(name).corrupt(0, plans)
    assert plans[2][0].tensor.tolist() == pytest.approx(expect)
    assert plans[0][0].tensor.tolist() == [1.0, 1.0]  # the honest untouched


def test_sybil_clones_send_one_update_and_constant_keeps_its_direction():
    plans = _plans({0: [1.0, 1.0], 1: [2.0, 5.0], 2: [3.0, 4.0]})
    _attack("sybil", attackers=2).corrupt(0, plans)
    assert plans[1][0].tensor.tolist() == plans[2][0].tensor.tolist() == [-2.0, -5.0]
    attack = _attack("constant")
    sent = []
    for r in range(2):
        plans = _plans({0: [1.0, 1.0], 1: [1.0, 1.0], 2: [3.0 * (r + 1), 4.0 * (r + 1)]})
        attack.corrupt(r, plans)
        sent.append(plans[2][0].tensor)
    assert sent[0].norm().item() == pytest.approx(50.0)  # 10 x ||(3, 4)||
    assert torch.allclose(sent[1], 2 * sent[0])  # the same direction every round


def test_alie_sits_z_deviations_below_the_honest_mean():
    plans = _plans({0: [1.0, 0.0], 1: [3.0, 0.0], 2: [5.0, 0.0], 3: [0.0, 0.0]})
    attack = Attack(AttackConfig(name="alie", attackers=1), 4)
    attack.corrupt(0, plans)
    z = alie_z(4, 1)  # s = 2, z = Phi^-1(1/2) = 0
    assert z == pytest.approx(0.0, abs=1e-9)
    assert plans[3][0].tensor.tolist() == pytest.approx([3.0, 0.0])
    assert alie_z(8, 2) == pytest.approx(0.3186, abs=1e-3)  # the paper's n = 8, f = 2


def test_stale_sends_what_it_had_delay_rounds_ago_and_start_round_waits():
    attack = _attack("stale", delay_rounds=2, start_round=2)
    sent = []
    for r in range(5):
        plans = _plans({0: [0.0], 1: [0.0], 2: [float(r)]})
        attack.corrupt(r, plans)
        sent.append(plans[2][0].tensor.item())
    assert sent == [0.0, 1.0, 0.0, 1.0, 2.0]  # honest in rounds 0 and 1


def test_label_flip_and_attacks_real_processes_cannot_carry_out_are_refused_clearly():
    attack = _attack("label_flip")
    x, y = attack.batch(2, 0, (torch.zeros(2), torch.tensor([0, 3])))
    assert y.tolist() == [3, 0]
    assert attack.batch(1, 0, (x, y))[1].tolist() == [3, 0]  # honest: unchanged
    with pytest.raises(ConfigError, match="classes"):
        Attack(AttackConfig(name="label_flip", attackers=1), 3)
    for name in ("alie", "ipm", "sybil"):  # they read others' updates: a shared folder
        with pytest.raises(ConfigError, match="attack.shared_dir"):
            refuse_simulator_only(from_dict({"workers": 3, "attack": {"name": name}}))
        refuse_simulator_only(from_dict({"workers": 3, "attack": {"name": name,
                                                                  "shared_dir": "x"}}))


def _colluding(name, tmp_path, rows, attackers=(2, 3), members=(0, 1, 2, 3)):
    """What each attacker of ``attackers`` sends when each is a process of its own (its own
    Attack, its own plans) and they share ``tmp_path``: {attacker: sent}."""
    import threading

    out = {}

    def one(w):
        attack = _attack(name, attackers=attackers, workers=len(members))
        attack.collude(tmp_path, w)
        plans = _plans({w: rows[w]})
        attack.corrupt(0, plans, members)
        out[w] = plans[w][0].tensor

    threads = [threading.Thread(target=one, args=(w,)) for w in attackers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_real_attackers_share_their_honest_updates_through_the_folder(tmp_path):
    """Each attacker a process of its own: Sybil identities all send the first attacker's
    update (the simulator's result), IPM and ALIE estimate the honest updates from the
    attackers' own; the folder keeps no more than two rounds."""
    rows = {0: [1.0, 1.0], 1: [2.0, 5.0], 2: [3.0, 4.0], 3: [5.0, 8.0]}
    sybil = _colluding("sybil", tmp_path / "s", rows)
    sim = _plans(rows)
    _attack("sybil", attackers=(2, 3), workers=4).corrupt(0, sim)
    assert all(torch.equal(sybil[w], sim[w][0].tensor) for w in (2, 3))
    assert sybil[3].tolist() == [-3.0, -4.0]
    ipm = _colluding("ipm", tmp_path / "i", rows)
    assert ipm[2].tolist() == ipm[3].tolist() == pytest.approx([-2.0, -3.0])  # -0.5 x (4, 6)
    alie = _colluding("alie", tmp_path / "a", rows)
    z, std = alie_z(4, 2), torch.tensor([[3.0, 4.0], [5.0, 8.0]]).std(dim=0)
    assert alie[2].tolist() == pytest.approx((torch.tensor([4.0, 6.0]) - z * std).tolist())
    (tmp_path / "r").mkdir()
    for stale in ("r9-c0-w2.pt", "r9-c0-w1.pt"):  # an earlier run's: its own go at its start
        torch.save(torch.zeros(2), tmp_path / "r" / stale)
    attack = _attack("sybil", attackers=(2,), workers=4)
    attack.collude(tmp_path / "r", 2)
    for r in range(4):
        attack.corrupt(r, _plans({2: [float(r)]}), (0, 1, 2))
    assert sorted(f.name for f in (tmp_path / "r").iterdir()) == [
        "r2-c0-w2.pt", "r3-c0-w2.pt", "r9-c0-w1.pt"]


def test_an_accomplice_that_never_shares_is_left_out_after_the_timeout(tmp_path, caplog):
    attack = _attack("sybil", attackers=(2, 3), workers=4)
    attack.collude(tmp_path, 3)
    attack._shared.timeout_s = 0.2
    plans = _plans({3: [1.0, 2.0]})
    attack.corrupt(0, plans, (0, 1, 2, 3))  # worker 2 never writes
    assert plans[3][0].tensor.tolist() == [-1.0, -2.0]  # its own, as the first it has
    assert "without its accomplices [2]" in caplog.text


def test_a_nan_sender_is_banned_at_once_and_the_run_goes_on(tmp_path):
    """The payload is the proof: its sender (worker 4) is banned in the round it attacks, the
    others commit every round without it and end finite."""
    sim, s = _sim("attack.name='nan'", "attack.attackers=1", "attack.start_round=2",
                  out_dir=tmp_path / "run")
    assert [b["worker"] for b in s["banned"]] == [4]
    assert s["banned"][0]["round"] == 2 and "NaN" in s["banned"][0]["reason"]
    assert s["attackers"] == [4]
    assert torch.isfinite(sim.final_params).all()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert sorted(r["round"] for r in rows if r["worker"] == 4) == [0, 1]
    assert sorted(r["round"] for r in rows if r["worker"] == 0) == list(range(6))


def test_a_ban_that_leaves_fewer_rows_than_the_rules_f_needs_does_not_end_the_run():
    """Multi-Krum with f = 1 needs 5 rows: 5 workers start, the NaN sender is banned, and the
    4 left go on with f = 0 (a warning says so) instead of the run failing."""
    with pytest.warns(IslandsWarning, match="multi_krum with f = 1 needs n >= 5 rows and got 4"):
        sim, s = _sim("aggregator.name='multi_krum'", "aggregator.f=1", "attack.name='nan'",
                      "attack.attackers=1", "attack.start_round=2")
    assert [b["worker"] for b in s["banned"]] == [4] and s["rounds"] == 6
    assert torch.isfinite(sim.final_params).all()


def test_a_rule_the_workers_cannot_carry_from_the_start_is_refused_before_it_runs():
    with pytest.raises(ConfigError, match=r"'bulyan' with 5 rows a sync \(workers = 5\): "
                                          "bulyan with f = 1 needs n >= 7"):
        _sim("aggregator.name='bulyan'", "aggregator.f=1")
    # FedAvg's sample of half the 8 workers: 4 rows a sync, where Krum with f = 1 needs 5
    with pytest.raises(ConfigError, match=r"'krum' with 4 rows a sync \(workers = 8\)"):
        _sim("algorithm.name=local_sgd", "algorithm.participation=0.5",
             "aggregator.name='krum'", "aggregator.f=1", workers=8)


def test_a_forged_weight_is_refused_by_its_receivers_and_its_sender_banned():
    """LocalSGD weighs by samples: an attacker claiming 1e9 would own the average. Every
    receiver checks the header against the round's weight, so worker 4 is named and banned,
    and the honest end where a run without it does."""
    _, s = _sim("algorithm.name=local_sgd", "attack.name=forged_weight",
                "attack.attackers=1")
    assert [b["worker"] for b in s["banned"]] == [4]
    assert "claims aggregation weight 1e+09" in s["banned"][0]["reason"]
    sim_without, _ = _sim("algorithm.name=local_sgd", "faults=[{kind='leave', worker=4, "
                          "round=0}]")
    attacked, _ = _sim("algorithm.name=local_sgd", "attack.name=forged_weight",
                       "attack.attackers=1")
    assert torch.equal(attacked.final_params, sim_without.final_params)


def test_without_the_check_a_forged_weight_owns_the_average():
    """The check is what stops it: read from its header, the weight 1e9 gives the attacker
    the whole average (a mutation of the receivers' check fails this)."""
    from islands.collectives import butterfly

    clean, _ = _sim("algorithm.name=local_sgd")
    original = butterfly.header_weights
    try:
        butterfly.header_weights = lambda msgs, members, weights, what: torch.tensor(
            [m.weight for m in msgs], dtype=torch.float64)
        forged, s = _sim("algorithm.name=local_sgd", "attack.name=forged_weight",
                         "attack.attackers=1")
    finally:
        butterfly.header_weights = original
    assert s["banned"] == []
    assert not torch.equal(forged.final_params, clean.final_params)


def test_mean_under_sign_flip_is_dragged_and_a_robust_rule_bans_the_attacker(tmp_path):
    """Two of five flip their sign x10: the mean follows them; the coordinate median does
    not, its influence statistics put the attackers near 0, and the ban rule excludes both
    (and no one else) after ban_after syncs."""
    clean, c = _sim()
    mean, m = _sim("attack.name=sign_flip", "attack.attackers=2")
    median, s = _sim("attack.name=sign_flip", "attack.attackers=2", "aggregator.name=median",
                     "aggregator.ban_after=3", out_dir=tmp_path / "run")
    assert m["final_eval_loss"] > c["final_eval_loss"] * 1.05
    assert s["final_eval_loss"] < m["final_eval_loss"]
    assert sorted(b["worker"] for b in s["banned"]) == [3, 4]
    assert all(b["round"] == 2 for b in s["banned"])  # the third sync, rounds 0-2
    infl = s["influence_by_worker"]
    assert max(infl["3"], infl["4"]) < 0.1 < min(infl[str(i)] for i in range(3))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    first = [r for r in rows if r["round"] == 0]
    assert {"influence", "distance_to_aggregate", "cosine_to_aggregate"} <= set(first[0])
    by = {r["worker"]: r for r in first}
    assert by[4]["cosine_to_aggregate"] < 0 < by[0]["cosine_to_aggregate"]


def test_no_attacker_no_ban_and_the_clean_rows_carry_the_statistics():
    _, s = _sim("aggregator.name=median")
    assert "banned" not in s and len(s["influence_by_worker"]) == 5


def test_attacks_on_async_local_sgd_are_refused():
    with pytest.raises(ConfigError, match="async_local_sgd"):
        _sim("algorithm.name=async_local_sgd", "attack.name=noise", "attack.attackers=1")


def test_real_processes_take_the_attacks_a_lone_process_can_carry_out():
    for name in ("noise", "nan", "forged_weight", "false_accuser"):
        refuse_simulator_only(tiny_config(f"attack.name='{name}'", "attack.attackers=1"))


def test_a_lying_shard_owner_is_caught_by_verification_and_banned():
    """Worker 4 owns a shard of the butterfly and returns -10x its true aggregate. Without
    verification every worker applies the lie; with ``aggregator.verify = 1`` its verifier
    recomputes the shard from the same inputs, the owner (not its victims) is banned, and the
    others end where a run without worker 4 from the start of the lie does."""
    clean, c = _sim()
    lied, s_lied = _sim("attack.name='lying_aggregator'", "attack.attackers=1")
    assert s_lied["final_eval_loss"] > c["final_eval_loss"] * 1.05
    assert "banned" in s_lied and s_lied["banned"] == []
    caught, s = _sim("attack.name='lying_aggregator'", "attack.attackers=1",
                     "aggregator.verify=1.0")
    assert [b["worker"] for b in s["banned"]] == [4]
    assert s["banned"][0]["round"] == 0 and "recomputation" in s["banned"][0]["reason"]
    without, _ = _sim("faults=[{kind='leave', worker=4, round=0}]")
    assert torch.equal(caught.final_params, without.final_params)


def test_verification_of_honest_owners_changes_nothing_but_the_bytes():
    plain, p = _sim("aggregator.name=median")
    verified, v = _sim("aggregator.name=median", "aggregator.verify=1.0")
    assert torch.equal(plain.final_params, verified.final_params)
    assert "banned" not in v
    # each member sends the payloads of one shard to its verifier again: about one more
    # reduce-scatter's upload, (n - 1) / n of the vector
    extra = v["bytes_sent_per_worker"] - p["bytes_sent_per_worker"]
    assert 0.3 * p["bytes_sent_per_worker"] < extra < 0.7 * p["bytes_sent_per_worker"]


def test_verify_needs_a_lossless_codec_and_a_rule_without_state():
    with pytest.raises(ConfigError, match="lossless"):
        _sim("aggregator.verify=0.5", "codec.name=int8")
    with pytest.raises(ConfigError, match="all_gather"):
        _sim("aggregator.verify=0.5", "aggregator.name=centered_clip")


@pytest.mark.parametrize("sets, match", [
    (["algorithm.overlap=delayed"], "overlaps"),
    (["algorithm.name=ddp", "attack.name='nan'"], "data-parallel"),
])
def test_attacks_the_simulator_cannot_retry_yet_are_refused(sets, match):
    with pytest.raises(ConfigError, match=match):
        _sim("attack.name='noise'", "attack.attackers=1", *sets)


def test_ddp_gradients_under_sign_flip_are_held_by_the_median():
    _, m = _sim("algorithm.name=ddp", "attack.name='sign_flip'", "attack.attackers=1",
                "aggregator.ban_after=1000")
    _, r = _sim("algorithm.name=ddp", "attack.name='sign_flip'", "attack.attackers=1",
                "aggregator.name=median", "aggregator.ban_after=1000")
    assert r["final_eval_loss"] < m["final_eval_loss"]


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_coordinate_wise_rule_in_the_butterfly_is_the_rule_on_whole_rows(rule):
    """Shard by shard, each owner with its own rule object: the same values as the rule over
    the whole stacked contributions, on every member."""
    from islands.aggregators import coordinate_median, trimmed_mean
    from islands.codecs import Identity
    from islands.collectives.butterfly import Group
    from islands.core.registry import lookup
    from islands.transports.sim import NetworkModel, SimTransport, VirtualClock

    n = 7
    torch.manual_seed(0)
    xs = {i: torch.randn(1003) * (1 + 10 * (i >= 5)) for i in range(n)}
    section = lookup("aggregator", rule).config()
    rules = {i: section.build() for i in range(n)}
    t = SimTransport(n, NetworkModel(), VirtualClock(n))
    out = Group(t, tuple(range(n))).all_reduce(xs, codecs={i: Identity() for i in range(n)},
                                               aggregator=rules)
    stacked = torch.stack([xs[i] for i in range(n)])
    want = (coordinate_median(stacked) if rule == "median"
            else trimmed_mean(stacked, trim=section.trim))
    for i in range(n):
        assert torch.equal(out[i], want)
    assert all(len(r.take_reports()) == 1 for r in rules.values())  # one shard each


def test_the_clone_filter_keeps_the_first_of_each_group_and_changes_nothing_else():
    from islands.aggregators import Median

    torch.manual_seed(0)
    honest = torch.randn(5, 300)
    clone = -honest[0]
    stacked = torch.cat([honest, clone[None], clone[None] * 2.0])  # 2.0 x: cosine 1
    rule = Median()
    rule.clones = 0.999
    out = rule(stacked)
    assert torch.equal(out, Median()(stacked[:6]))  # the second clone never reached it
    assert rule.influence[6] == 0 and rule.influence[5] > 0
    plain = Median()
    plain.clones = 0.999
    assert torch.equal(plain(honest), Median()(honest))  # no clones: the same bits


def test_sybil_clones_are_filtered_and_banned_while_a_clean_run_is_unchanged():
    _, s = _sim("attack.name='sybil'", "attack.attackers=2", "aggregator.name=centered_clip",
                "aggregator.clones=0.999")
    assert [b["worker"] for b in s["banned"]] == [4]  # the second identity: influence 0
    clean, _ = _sim("aggregator.name=centered_clip")
    filtered, _ = _sim("aggregator.name=centered_clip", "aggregator.clones=0.999")
    assert torch.equal(clean.final_params, filtered.final_params)


def test_a_false_accuser_is_banned_at_its_first_accusation_and_nobody_else_is():
    """Worker 4 accuses worker 0 from round 2: worker 0's messages pass every check of that
    sync, so the accusation is false and worker 4 is banned; the others train on."""
    sim, s = _sim("attack.name='false_accuser'", "attack.attackers=1", "attack.start_round=2")
    assert [(b["worker"], b["round"]) for b in s["banned"]] == [(4, 2)]
    assert "false accusation of worker 0" in s["banned"][0]["reason"]
    clean, c = _sim()
    assert s["final_eval_loss"] == pytest.approx(c["final_eval_loss"], rel=0.05)
