"""The simulator: N workers in one process, a network model and a virtual clock."""

from islands.sim.runner import Simulation, simulate

__all__ = ["Simulation", "simulate"]
