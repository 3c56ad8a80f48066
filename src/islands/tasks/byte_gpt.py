"""The built-in ``byte_gpt`` task: a byte-level GPT (``islands.models.GPT``) trained on text
(``[data] corpus``: the running Python's standard library by default, or the user's files),
next-byte cross-entropy, evaluated on held-out files (nats per byte).

Configured by ``[model]`` and ``[data]``; the main job of ``islands demo`` trains it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from islands.core.errors import ConfigError
from islands.core.registry import register
from islands.core.sections import DataConfig, TaskConfig
from islands.data import ByteData, TextDataConfig
from islands.models import GPT, GPTConfig
from islands.models.gpt import VOCAB
from islands.tasks.base import Batch, Task, to_device


class ByteGPT(Task):
    """Next-byte prediction with a small GPT.

    Args:
        model: the GPT's sizes.
        data: the corpus and its split (the validation batches follow ``seed``).
        seed: the run's seed (draws the fixed validation batches).
    """

    name = "byte_gpt"
    classes = VOCAB  # the next byte

    def __init__(self, model: GPTConfig, data: TextDataConfig, seed: int) -> None:
        self.model_cfg, self.data_cfg, self.seed = model, data, seed
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def model(self) -> nn.Module:
        return GPT(self.model_cfg)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    def data(self, workers: int, seed: int, spec: DataConfig) -> ByteData:
        return ByteData(spec, workers=workers, block_size=self.model_cfg.block_size, seed=seed)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self._val is None:
            self._val = self.data(1, self.seed, self.data_cfg).val_batches()
        device = next(model.parameters()).device
        losses = [float(model(*to_device(b, device))[1]) for b in self._val]
        return {"eval_loss": sum(losses) / len(losses)}


def _from_config(run) -> ByteGPT:
    if run.task.kwargs:
        raise ConfigError(f"task.kwargs ({dict(run.task.kwargs)}) do not apply to task "
                          "'byte_gpt': configure it with [model] and [data]")
    return ByteGPT(run.model, run.data, run.seed)


register("task", "byte_gpt", sections={"model": GPTConfig, "data": TextDataConfig},
         default=True, factory=_from_config)(TaskConfig)
