"""Small reference models."""

from islands.models.gpt import GPT

__all__ = ["GPT"]
