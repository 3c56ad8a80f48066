"""Core types shared by every layer: errors and the run configuration. No torch.distributed."""
