"""The engine: the one round loop (inner steps, contribute -> reduce -> apply, evaluation,
metrics, run directory) that the simulator and the real runtime both drive, and the builders
of a run's pieces from its config."""

from islands.engine.build import (
    Assembly,
    assemble,
    attach,
    build_worker,
    check_config,
    fresh_state,
    initial_model,
    inner_optimizer,
    resolve_device,
    resolve_threads,
    run_codec,
    threads,
    warm_start,
)
from islands.engine.loop import Driver, Engine, RoundPlan, Sync, WallClock

__all__ = ["Assembly", "Driver", "Engine", "RoundPlan", "Sync", "WallClock", "assemble",
           "attach", "build_worker", "check_config", "fresh_state", "initial_model",
           "inner_optimizer", "resolve_device", "resolve_threads", "run_codec", "threads",
           "warm_start"]
