"""The zygote that forks the integration tests' processes behaves as a fresh interpreter
would: argv, ``__main__``, the environment, the working directory, stdout and stderr, exit
codes, death by a signal, a fresh random seed."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.integration import zygote
from tests.integration.conftest import popen

SCRIPT = """
import os, random, sys
print(__name__, sys.argv[1:], os.environ["OMP_NUM_THREADS"], os.getcwd(), random.random())
print("to stderr", file=sys.stderr)
raise SystemExit(int(sys.argv[1]))
"""


def _run(argv, cwd=None):
    p = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    out, err = p.communicate(timeout=60)
    return p, out, err


def test_a_forked_process_is_what_a_fresh_interpreter_would_be(tmp_path):
    p, out, err = _run([sys.executable, "-c", SCRIPT, "3", "x"], cwd=tmp_path)
    assert p.returncode == 3 and "to stderr" in err
    assert out.split()[:5] == ["__main__", "['3',", "'x']", "1", str(tmp_path)], out
    _, again, _ = _run([sys.executable, "-c", SCRIPT, "0"], cwd=tmp_path)
    assert again.split()[-1] != out.split()[-1]  # each process its own random seed
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv)\n")
    p, out, _ = _run([sys.executable, str(script), "a"])
    assert p.returncode == 0 and out.strip() == f"__main__ ['{script}', 'a']"
    p, out, _ = _run([sys.executable, "-m", "json.tool", "--help"])
    assert p.returncode == 0 and "usage" in out
    p, _, err = _run([sys.executable, "-c", "raise ValueError('boom')"])
    assert p.returncode == 1 and "ValueError: boom" in err


def test_signals_reach_the_process_and_its_death_reads_as_minus_the_signal():
    p = popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == "up"
    assert p.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.1)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    if zygote.enabled():
        assert isinstance(p, zygote.Forked)
