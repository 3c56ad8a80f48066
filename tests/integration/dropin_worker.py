"""A user's own training loop with islands dropped in (the drop-in tests run it as a worker).

    python tests/integration/dropin_worker.py COORDINATOR|- WORKER_ID OUT [--set k=v ...]

The model, optimizer and batches are the task's and the config's, built as the simulator
builds them, so a run where nothing fails ends with the simulator's global parameters.
"""

from __future__ import annotations

import sys

sys.path.insert(0, ".")  # the task module lives in tests/

import torch  # noqa: E402

import islands  # noqa: E402
from islands.engine import initial_model, inner_optimizer  # noqa: E402
from islands.tasks import build_task  # noqa: E402

coordinator, worker_id, out = sys.argv[1:4]
sets = [a for a in sys.argv[4:] if a != "--set"]
cfg = islands.load_config(None, sets)
task = build_task(cfg)
model = initial_model(cfg, task, torch.device("cpu"))
optimizer, scheduler = inner_optimizer(model, cfg)
data = task.data(cfg.workers, cfg.seed, cfg.data)

with islands.join(None if coordinator == "-" else coordinator, config=cfg,
                  worker_id=worker_id, out=out) as job:
    trainer = job.wrap(model, optimizer, scheduler=scheduler, evaluate=task.evaluate)
    while not trainer.done:
        model.train()
        batch = data.batch(job.me, trainer.inner_step)  # where the run is (a joiner too)
        loss = task.loss(model, batch)
        loss.backward()
        trainer.step(loss, samples=task.batch_size(batch))
print("done", flush=True)
