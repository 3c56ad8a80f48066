"""An ``islands run`` worker whose payloads are malformed (one value short): what a buggy or
hostile peer sends. It joins with the job's config, so only its contributions give it away.

    python tests/integration/liar_worker.py [islands run arguments]
"""

from __future__ import annotations

import sys

sys.path.insert(0, ".")  # tests/ holds the liar codec

import islands.engine.build as build  # noqa: E402
from islands.cli.runtime_cmd import main  # noqa: E402
from tests.unit.test_butterfly import _Liar  # noqa: E402

build.build_codec = lambda cfg: _Liar("short")
sys.exit(main(["run", *sys.argv[1:]]))
