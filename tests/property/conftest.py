"""Hypothesis profiles for the property tests: ``ci`` is derandomized (the same examples on
every run); ``dev`` (the default) explores new ones. CI sets ``HYPOTHESIS_PROFILE=ci``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
