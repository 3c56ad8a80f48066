"""A plain PyTorch training loop on the 8x8 digits, with islands dropped in: the model, the
optimizer, the DataLoader and the loop are the user's own; the lines marked `islands` are all
it takes to train it with DiLoCo across processes that may crash and rejoin.

Run it (a coordinator and two workers on this machine):

    islands coordinator --port 29400 --host 127.0.0.1 &
    python examples/dropin_digits.py --coordinator 127.0.0.1:29400 --worker-id 0 &
    python examples/dropin_digits.py --coordinator 127.0.0.1:29400 --worker-id 1

or as a fixed group: ``torchrun --nproc-per-node 2 examples/dropin_digits.py``. Kill a worker
and start it again: it receives the committed state and goes on. Each worker writes
runs/dropin_digits-job/w<id>/ (metrics.jsonl, summary.json, final.safetensors, loss.png)
and, once both are done, the job's merged summary.json and final.safetensors in
runs/dropin_digits-job/.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import islands


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", default=None, help="HOST:PORT (omit under torchrun)")
    p.add_argument("--worker-id", default=None, help="this worker's id (default: $RANK)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    order = np.random.default_rng(0).permutation(len(y))
    val, train = order[:360], order[360:]

    config = [f"workers={args.workers}", f"steps={args.steps}", "algorithm.name=diloco",  # islands
              "algorithm.sync_every=25", "eval_every=50", "name=dropin_digits"]
    with islands.join(args.coordinator, overrides=config, worker_id=args.worker_id) as job:  # islands
        torch.manual_seed(0)  # every worker builds the same model
        model = Net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        mine = train[job.me::args.workers]  # this worker's share
        loader = DataLoader(TensorDataset(x[mine], y[mine]), batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(job.me))
        loss_fn = nn.CrossEntropyLoss()

        def evaluate(m: nn.Module) -> dict:
            out = m(x[val])
            return {"eval_loss": float(loss_fn(out, y[val])),
                    "accuracy": float((out.argmax(1) == y[val]).float().mean())}

        trainer = job.wrap(model, optimizer, evaluate=evaluate)  # islands
        for xb, yb in itertools.chain.from_iterable(itertools.repeat(loader)):
            model.train()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            trainer.step(loss)  # islands: replaces optimizer.step() and zero_grad()
            if trainer.done:  # islands
                break
    print(f"worker {job.me}: done at round {trainer.round}", flush=True)


if __name__ == "__main__":
    main()
