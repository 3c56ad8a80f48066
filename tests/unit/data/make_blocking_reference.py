"""Prints the blocking algorithms' figures (virtual times, losses, bytes) on tiny configs,
which ``blocking_reference.json`` holds as the release before the timeline clock gave them:

    cd CHECKOUT && python tests/unit/data/make_blocking_reference.py . > blocking_reference.json

(``test_overlap.py`` holds the current code to them.)
"""

import json
import sys

sys.path.insert(0, sys.argv[1] + "/src")
sys.path.insert(0, sys.argv[1])
from islands.sim.runner import Simulation  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

CASES = {
    "ddp": ["algorithm.name=ddp"],
    "diloco": ["algorithm.name=diloco", "algorithm.sync_every=4"],
    "diloco-ddp-phase": ["algorithm.name=diloco", "algorithm.sync_every=4",
                         "algorithm.ddp_steps=3"],
    "local_sgd": ["algorithm.name=local_sgd", "algorithm.sync_every=3"],
    # half the workers a round: those back from sitting one out are refreshed first
    "local_sgd-participation": ["algorithm.name=local_sgd", "algorithm.sync_every=3",
                                "algorithm.participation=0.5"],
    "diloco-slow-link": ["algorithm.name=diloco", "algorithm.sync_every=4",
                         "network.worker=[{id = 1, upload_bps = 2e6}]",
                         "compute.step_time_s=0.05"],
    "diloco-straggler": ["algorithm.name=diloco", "algorithm.sync_every=4",
                         "compute.worker=[{id = 2, step_time_s = 0.3}]"],
}
KEYS = ("virtual_time_s", "final_eval_loss", "bytes_sent_per_worker", "compute_utilization",
        "compute_s_by_worker", "idle_s_by_worker")
out = {}
for name, sets in CASES.items():
    s = Simulation(tiny_config("workers=3", "steps=12", "eval_every=6", *sets)).run()
    out[name] = {"overrides": sets, **{k: s[k] for k in KEYS}}
print(json.dumps(out, indent=1))
