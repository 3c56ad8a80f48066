"""An ``islands run`` worker that declares itself the round's only member at every ``ready``
(what a hostile peer holding the job's token could send): its victims would be left out.

    python tests/integration/misreport_worker.py [islands run arguments, --worker-id N]
"""

from __future__ import annotations

import sys

from islands.cli.runtime_cmd import main
from islands.runtime.membership import CoordinatorClient

_request = CoordinatorClient.request
me = int(sys.argv[sys.argv.index("--worker-id") + 1])


def request(self, op, **fields):
    if op == "ready":
        fields["members"] = [me]
    return _request(self, op, **fields)


CoordinatorClient.request = request
sys.exit(main(["run", *sys.argv[1:]]))
