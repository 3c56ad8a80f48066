"""Config loading: TOML, dotted overrides, and errors that name the key, value and rule."""

from __future__ import annotations

import pytest

from islands.core.config import RunConfig, load_config, parse_overrides
from islands.core.errors import ConfigError
from islands.engine import check_config


def test_defaults_are_the_main_job_setup():
    cfg = RunConfig()
    assert (cfg.workers, cfg.steps, cfg.algorithm.name) == (4, 500, "diloco")
    assert (cfg.network.bandwidth_bps, cfg.network.latency_s) == (100e6, 0.05)
    assert (cfg.outer.optimizer, cfg.outer.lr, cfg.outer.momentum, cfg.outer.nesterov) == (
        "sgd", 0.7, 0.9, True)


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\nworkers = 8\n[algorithm]\nname = "local_sgd"\nsync_every = 20\n'
                    '[network]\nbandwidth_bps = 1e9\n[[network.worker]]\nid = 2\n'
                    'upload_bps = 1e6\n[[compute.worker]]\nid = 1\nstep_time_s = 0.5\n')
    cfg = load_config(path, ["algorithm.sync_every=100", "algorithm.name=diloco"])
    assert cfg.seed == 3 and cfg.workers == 8
    assert cfg.algorithm.sync_every == 100 and cfg.algorithm.name == "diloco"
    assert cfg.network.bandwidth_bps == 1e9 and cfg.network.worker[0].upload_bps == 1e6
    assert cfg.compute.worker[0].step_time_s == 0.5


def test_int_accepted_for_float_and_resolved_config_roundtrips():
    cfg = load_config(None, ["inner.lr=1", "outer.kwargs={dampening = 0.1}"])
    assert isinstance(cfg.inner.lr, float) and cfg.outer.kwargs == {"dampening": 0.1}
    from islands.core.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, fragment", [
    ("algorithm.sync_every=0", "algorithm.sync_every (0) must be >= 1"),
    ("algorithm.name=adam",
     "algorithm.name ('adam') must be one of ['async_local_sgd', 'ddp', 'diloco', 'dsgd', "
     "'gossip_diloco', 'local_sgd', 'modest', 'noloco', 'sparseloco', 'streaming_diloco']"),
    ("algorithm.name=dilco",
     "must be one of ['async_local_sgd', 'ddp', 'diloco', 'dsgd', 'gossip_diloco', "
     "'local_sgd', 'modest', 'noloco', 'sparseloco', 'streaming_diloco'] "
     "(did you mean "
     "'diloco'?)"),
    ("workers=two", "workers ('two') must be int"),
    ("workers=2.5", "workers (2.5) must be int"),
    ("inner.lr=-1", "inner.lr (-1.0) must be > 0"),
    ("algorithm.sync_every_steps=3", "unknown key algorithm.sync_every_steps in [algorithm] (did "
                                     "you mean algorithm.sync_every?); allowed: collective, "
                                     "ddp_steps, eager, grace_s, min_quorum, name, overlap, "
                                     "sync_every"),
    ("modle.n_layer=3", "unknown key modle in the top level (did you mean model?)"),
    ("inner.l=0.1", "unknown key inner.l in [inner] (did you mean inner.lr?)"),
    ("model.n_head=3", "model.n_embd (128) must be a multiple of model.n_head (3)"),
    ("outer.optimizer=nesterov", "outer.optimizer ('nesterov') must name a torch.optim"),
    ("codec.name=zip", "codec.name ('zip') must be one of"),
    ("data.partition=random", "data.partition ('random') must be one of"),
    ("algorithm.participation=0.5", "algorithm.participation (0.5) is read by algorithm "
                                    "'local_sgd' only; algorithm.name = 'diloco' does not read it: "
                                    "remove it, or set algorithm.name = 'local_sgd'"),
    ("device=tpu", "device ('tpu') must be one of"),
    ("network.worker=[{id = 9}]", "network.worker[0].id (9) must name a worker in [0, 3]"),
    ("outer.momentum=0", "outer.nesterov (True) needs outer.momentum > 0"),
    ("init.warm_start_steps=-5", "init.warm_start_steps (-5) must be >= 0 (0: no warm start)"),
    ("aggregator.name=medain", "aggregator.name ('medain') must be one of"),
    ("task.name=gpt", "task.name ('gpt') must be one of ['byte_gpt', 'digits_cnn'] or an import"),
    ("task.name=digit_cnn", "(did you mean 'digits_cnn'?)"),
    ("task.name='nowhere_pkg.tasks:make'", "cannot import 'nowhere_pkg.tasks'"),
    ("task.name='islands.tasks:no_such'", "module 'islands.tasks' has no attribute 'no_such'"),
    ("task.name='islands.tasks:to_device'", "the factory raised TypeError"),
    ("task.name='islands.core.seeding:derive_seed'", "returned int, not an islands.tasks.Task"),
    ("task.kwargs={channels = 8}", "task.kwargs ({'channels': 8}) do not apply to task 'byte_gpt'"),
])
def test_bad_values_name_key_value_and_rule(override, fragment):
    """Everything is refused before anything runs: by the loader (types, ranges) or by
    check_config, which builds each named component once (codec, aggregator, task)."""
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, [override]))
    assert fragment in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("model.n_layer=2", "model.n_layer (2) is read by task 'byte_gpt' only; task "
                        "'digits_cnn' does not read it: remove it (settings of your own model "
                        "go in [task.kwargs])"),
    ("data.corpus='/tmp'", "data.corpus ('/tmp') is read by task 'byte_gpt' only; task "
                           "'digits_cnn' does not read [data]'s corpus: remove it"),
    ("task.kwargs={channels = 0}", "the factory raised ValueError: channels (0) must be >= 1"),
])
def test_settings_the_task_does_not_read_are_refused(override, fragment):
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, ["task.name=digits_cnn", override]))
    assert fragment in str(e.value)
    check_config(load_config(None, ["task.name=digits_cnn", "data.partition=dirichlet",
                                    "data.batch_size=32"]))  # the keys every task reads


def test_unknown_top_level_key_lists_allowed(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("wokers = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key wokers in the top level \(did you mean "
                                          r"workers\?\); allowed: .*workers"):
        load_config(path)


def test_missing_and_broken_files():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.toml")


def test_invalid_toml(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("workers = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_override_syntax():
    assert parse_overrides(["a.b=3", "c=x y", "d=[1, 2]"]) == {"a.b": 3, "c": "x y",
                                                                "d": [1, 2]}
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["sync_every"])


def test_a_torchrun_world_size_other_than_workers_is_refused(monkeypatch):
    from islands.runtime.launch import fixed_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fixed_world(load_config(None, ["workers=2"])) == 2
    with pytest.raises(ConfigError, match=r"torchrun started 2 processes \(WORLD_SIZE\) but the "
                                          r"config has workers = 3"):
        fixed_world(load_config(None, ["workers=3"]))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="give --coordinator HOST:PORT, or run under torchrun"):
        fixed_world(load_config(None, ["workers=3"]))


def test_config_json_records_only_what_the_runs_components_read():
    gpt = load_config(None, []).to_dict()
    assert "model" in gpt and "corpus" in gpt["data"] and "outer" in gpt
    user = load_config(None, ["task.name='tests.user_task:make_task'", "algorithm.name=ddp"])
    d = user.to_dict()
    assert "model" not in d and "outer" not in d
    assert d["data"] == {"partition": "iid", "alpha": 0.5, "batch_size": 8}
    assert d["algorithm"] == {"name": "ddp"}
    assert d["codec"] == {"name": "identity", "error_feedback": False,
                          "error_feedback_beta": 1.0, "entropy": False}


def test_a_task_object_is_recorded_as_such_without_the_gpts_sections():
    from islands.sim.runner import Simulation
    from tests.user_task import make_task

    sim = Simulation(load_config(None, ["workers=2", "steps=2", "algorithm.sync_every=2",
                                       "device=cpu"]), task=make_task())
    d = sim.cfg.to_dict()
    assert d["task"]["name"] == "object:user_mlp" and "model" not in d
    with pytest.raises(ConfigError, match="model.n_layer \\(2\\) is read by task 'byte_gpt'"):
        Simulation(load_config(None, ["model.n_layer=2"]), task=make_task())
    from islands.tasks import build_task

    with pytest.raises(ConfigError, match="stands for a Task object passed in Python"):
        build_task(sim.cfg)


def test_an_other_algorithms_section_warns_when_set_and_is_dropped():
    from islands.core.errors import IslandsWarning

    with pytest.warns(IslandsWarning, match=r"outer.lr \(0.5\) is read by algorithm "
                                            r"'async_local_sgd', algorithm 'diloco', "
                                            r"algorithm 'gossip_diloco', algorithm 'noloco', "
                                            r"algorithm 'sparseloco', "
                                            r"algorithm 'streaming_diloco' only; algorithm "
                                            r"'ddp' does not read it"):
        cfg = load_config(None, ["algorithm.name=ddp", "outer.lr=0.5"])
    assert cfg.outer is None and "outer" not in cfg.to_dict()
    assert load_config(None, ["algorithm.name=ddp", "algorithm.sync_every=50"]).to_dict()[
        "algorithm"] == {"name": "ddp"}  # a base config's H: no word, dropped
    back = cfg.replace(**{"algorithm.name": "diloco"})
    assert back.outer.lr == 0.7  # DiLoCo's section comes back with its defaults


def test_a_section_is_the_class_its_name_registered():
    from islands.algorithms import DiLoCoConfig, LocalSGDConfig
    from islands.codecs import Int8Config, codec_config

    cfg = load_config(None, ["algorithm.name=local_sgd", "algorithm.weighting=dataset"])
    assert isinstance(cfg.algorithm, LocalSGDConfig) and cfg.algorithm.weighting == "dataset"
    assert isinstance(load_config().algorithm, DiLoCoConfig)
    assert codec_config(name="int8", block=128) == Int8Config(block=128)
    with pytest.raises(ConfigError, match=r"unknown key codec.blok in \[codec\] \(did you mean "
                                          r"codec.block\?\)"):
        codec_config(name="int8", blok=128)


def test_a_saved_config_json_of_an_older_release_still_compares_equal():
    """config.json written before components owned their sections held every section (a
    DDP run's [outer], a user task's [model], every codec key); it describes the same run."""
    from islands.core.config import normalized

    cfg = load_config(None, ["algorithm.name=ddp", "task.name=digits_cnn"])
    old = {**cfg.to_dict(), "model": {"n_layer": 3, "n_head": 4, "n_embd": 128,
                                      "block_size": 64, "dropout": 0.0},
           "outer": {"optimizer": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True,
                     "kwargs": {}},
           "codec": {"name": "identity", "block": None, "fraction": None, "count": None,
                     "rank": None, "stochastic": None, "error_feedback": False,
                     "entropy": False},
           "algorithm": {"name": "ddp", "sync_every": 50, "ddp_steps": 0,
                         "participation": 1.0, "weighting": "samples"}}
    import json

    assert normalized(old) == json.loads(json.dumps(cfg.to_dict()))


def test_a_task_path_resolves_from_the_config_files_folder(tmp_path, monkeypatch):
    from islands.tasks import build_task

    project = tmp_path / "project"
    project.mkdir()
    (project / "helper.py").write_text("SAMPLES = 40\n")  # a module beside the task file
    (project / "mytask.py").write_text(
        "import torch, torch.nn as nn\nfrom torch.utils.data import TensorDataset\n"
        "import islands\nfrom helper import SAMPLES\n\n"
        "def make_task():\n    x = torch.randn(SAMPLES, 8)\n    y = x.sum(1)\n"
        "    ds = TensorDataset(x, y)\n"
        "    return islands.from_dataset(lambda: nn.Linear(8, 1), ds, ds, "
        "criterion=nn.MSELoss())\n")
    for name in ("mytask.py:make_task", "mytask:make_task"):
        (project / "run.toml").write_text(f'[task]\nname = "{name}"\n')
        monkeypatch.chdir(tmp_path)  # elsewhere: the config's folder decides
        assert len(build_task(load_config(project / "run.toml")).train) == 40, name
    (project / "run.toml").write_text('[task]\nname = "other.py:make_task"\n')
    with pytest.raises(ConfigError, match=r"other.py' does not exist \(a relative path "
                                          r"resolves from the config's folder"):
        build_task(load_config(project / "run.toml"))
