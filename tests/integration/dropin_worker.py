"""A user's own training loop with islands dropped in (the drop-in tests run it as a worker).

    python tests/integration/dropin_worker.py COORDINATOR|- WORKER_ID OUT [--stall R:S]
        [--step-s S] [--hold R:FILE] [--slow-exchange S] [--events FILE] [--set k=v ...]

The model is the task's, built after ``torch.manual_seed(job.seed)``; the optimizer is
``job.optimizer(model)`` and the batches ``job.batches(task)``, as the README says, so a run
where nothing fails ends with the simulator's global parameters. ``--stall R:S`` sleeps S
seconds inside the first inner step of round R (a worker stuck in its own loop); ``--step-s
S`` adds S seconds to every step (compute that takes time); ``--hold R:FILE`` waits inside the
first step of round R until FILE exists (a test holds the job there while it acts; one
``--hold`` per round; a SIGTERM meanwhile ends the loop: the worker leaves). ``--slow-exchange
S`` makes every exchange of the transport start S seconds late (a slow link); ``--events
FILE`` writes one JSON line per inner step (its round, a monotonic time) and per exchange (its
thread, start and end), to check what overlapped.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, ".")  # the task module lives in tests/

import torch  # noqa: E402

import islands  # noqa: E402
from islands.tasks import build_task  # noqa: E402

coordinator, worker_id, out = sys.argv[1:4]
args = sys.argv[4:]


def option(name: str, default: str) -> str:
    if name not in args:
        return default
    i = args.index(name)
    value = args[i + 1]
    del args[i:i + 2]
    return value


stall_round, stall_s = (float(x) for x in option("--stall", "-1:0").split(":"))
step_s = float(option("--step-s", "0"))
holds = {}  # round -> the file that releases it (--hold may be given more than once)
while "--hold" in args:
    r, _, path = option("--hold", "").partition(":")
    holds[int(r)] = Path(path)
slow_s = float(option("--slow-exchange", "0"))
events_path = option("--events", "")
events = open(events_path, "w") if events_path else None  # noqa: SIM115 (closed at exit)


def event(**fields) -> None:
    if events is not None:
        events.write(json.dumps(fields) + "\n")
        events.flush()


if slow_s or events is not None:
    from islands.transports.dist import DistTransport

    original = DistTransport.start_exchange

    def start_exchange(self, *a, **kw):
        t0 = time.monotonic()
        time.sleep(slow_s)
        try:
            return original(self, *a, **kw)
        finally:
            event(kind="exchange", thread=threading.current_thread().name, start=t0,
                  end=time.monotonic())

    DistTransport.start_exchange = start_exchange
sets = [a for a in args if a != "--set"]
cfg = islands.load_config(None, sets)
task = build_task(cfg)

with islands.join(None if coordinator == "-" else coordinator, config=cfg,
                  worker_id=worker_id, out=out) as job:
    torch.manual_seed(job.seed)
    model = task.model()
    optimizer, scheduler = job.optimizer(model)
    trainer = job.wrap(model, optimizer, scheduler=scheduler, evaluate=task.evaluate)
    stalled = False
    for batch in job.batches(task):  # where the run is (a joiner too)
        model.train()
        loss = task.loss(model, batch)
        loss.backward()
        time.sleep(step_s)
        while (trainer.round in holds and not holds[trainer.round].exists()
               and not job.stopping.is_set()):
            time.sleep(0.05)
        if job.stopping.is_set():  # SIGTERM while held: this loop ends (a clean leave)
            break
        if trainer.round == stall_round and not stalled:
            stalled = True
            time.sleep(stall_s)
        event(kind="step", round=trainer.round, at=time.monotonic())
        trainer.step(loss, samples=task.batch_size(batch))
        if trainer.done:
            break
print("done", flush=True)
