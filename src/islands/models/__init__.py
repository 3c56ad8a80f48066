"""Small reference models: a byte-level GPT and a CNN for 8x8 digits."""

from islands.models.cnn import DigitsCNN
from islands.models.gpt import GPT, GPTConfig

__all__ = ["DigitsCNN", "GPT", "GPTConfig"]
