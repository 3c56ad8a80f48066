"""Test processes forked from one interpreter that has already imported torch.

Every process an integration test starts is a real one (its own pid and memory, real sockets,
real signals and exit codes), but a fresh interpreter spends about 2 CPU-seconds importing
torch and, at its first optimizer, ``torch._dynamo``: on this project's 2-core machine that
was most of the suite's time. The zygote pays it once per test session; each process is then
a ``fork()`` of it that runs its ``python -m MODULE ...``, ``python SCRIPT ...`` or ``python
-c CODE ...`` as the interpreter would (``__main__``, ``sys.argv``, the environment, the working
directory, stdin/stdout/stderr, the exit code; a process killed by a signal reads ``-signum``).

The zygote is single-threaded when it forks (checked before every fork). ``ISLANDS_TEST_FORK=0``
starts every process as a fresh interpreter instead.

Protocol (a Unix socket, one connection per process): the client sends a JSON request with
the stdout and stderr descriptors attached; the zygote answers the child's pid, then, when the
child ends, its exit code.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# what every test process would import anyway, loaded once in the zygote
PRELOAD = ("torch", "torch._dynamo", "numpy", "islands", "islands.cli.runtime_cmd",
           "islands.cli.main", "islands.runtime.worker", "islands.runtime.launch",
           "islands.engine", "islands.metrics.plots", "islands.sweep",
           "islands.codecs.kernels")


def enabled() -> bool:
    return os.environ.get("ISLANDS_TEST_FORK", "1") != "0"


# --- the client side (in the test process) ------------------------------------------------

class Zygote:
    """The fork server of one test session, started on first use."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="islands-zygote-")
        self.path = os.path.join(self.dir, "sock")
        self.log = open(os.path.join(self.dir, "zygote.stderr"), "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.zygote",
                                      self.path], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test zygote did not start: "
                                   f"{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.02)

    def spawn(self, argv: list[str], *, env: dict[str, str], cwd: str | os.PathLike | None,
              stdout: int, stderr: int) -> Forked:
        """Starts ``argv`` (``[python, ...]``) as a fork of the zygote; ``stdout``/``stderr``
        are file descriptors or ``subprocess.PIPE`` (text, as ``Popen(text=True)``;
        ``subprocess.STDOUT`` for stderr)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        ours = []  # descriptors made here, closed once the zygote holds them
        fds, pipes = [], {}
        for name, fd in (("stdout", stdout), ("stderr", stderr)):
            if fd == subprocess.STDOUT:  # stderr into wherever stdout goes
                fd = fds[0]
            elif fd == subprocess.PIPE:
                r, w = os.pipe()
                pipes[name] = os.fdopen(r, "r")
                fd = w
                ours.append(w)
            fds.append(fd)
        request = {"argv": argv, "env": env, "cwd": str(cwd or os.getcwd())}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
        for fd in ours:
            os.close(fd)
        answers = _Lines(conn)
        line = answers.next(timeout=60)
        if not line or not line.startswith("pid "):
            raise RuntimeError(f"the test zygote refused {argv}: {line!r}")
        return Forked(argv, int(line.split()[1]), answers, pipes)

    def close(self) -> None:
        import shutil

        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class _Lines:
    """The zygote's answers on one connection, a line at a time."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buf = conn, b""

    def next(self, timeout: float | None) -> str | None:
        """The next line; ``None`` if none came within ``timeout``; ``""`` if it hung up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.conn], [], [], left)[0]:
                return None
            more = self.conn.recv(4096)
            if not more:
                return ""
            self.buf += more
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


class Forked:
    """A ``subprocess.Popen``-like handle on a process the zygote forked."""

    def __init__(self, args, pid: int, answers: _Lines, pipes: dict) -> None:
        self.args, self.pid, self.returncode = args, pid, None
        self._answers = answers
        self.stdout, self.stderr = pipes.get("stdout"), pipes.get("stderr")

    def _read_code(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        line = self._answers.next(timeout)
        if line is None:
            return False
        # a zygote gone without a word: the process cannot be waited on any more
        self.returncode = int(line.split()[1]) if line.startswith("exit ") else -9
        self._answers.conn.close()
        return True

    def poll(self) -> int | None:
        self._read_code(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._read_code(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple:
        """Reads stdout and stderr (those that are pipes) to their end, then waits."""
        import selectors

        data = {f: [] for f in (self.stdout, self.stderr) if f is not None}
        with selectors.DefaultSelector() as sel:
            for f in data:
                sel.register(f, selectors.EVENT_READ)
            deadline = None if timeout is None else time.monotonic() + timeout
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fileobj.fileno(), 1 << 16)
                    if chunk:
                        data[key.fileobj].append(chunk)
                    else:
                        sel.unregister(key.fileobj)
        self.wait(timeout)
        return tuple(b"".join(data[f]).decode() if f is not None else None
                     for f in (self.stdout, self.stderr))


# --- the server side (the zygote process) ---------------------------------------------------

def _serve(path: str) -> None:
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the client waits for the name: bound and listening
    children: dict[int, socket.socket] = {}
    zygote = os.getpid()

    def on_term(*_) -> None:
        if os.getpid() == zygote:
            sys.exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a child not yet past its set-up
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    parent = os.getppid()
    while os.getppid() == parent:  # a test session that died takes its zygote with it
        if select.select([listener], [], [], 0.01)[0]:
            conn, _ = listener.accept()
            pid = _fork(listener, conn, children)
            if pid is not None:
                children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


def _fork(listener: socket.socket, conn: socket.socket, children: dict) -> int | None:
    raw, fds, _, _ = socket.recv_fds(conn, 1 << 20, 4)
    while not raw.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        raw += more
    request = json.loads(raw)
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1:  # a fork would copy one thread of a multi-threaded process
        conn.sendall(f"error: the zygote has {len(tasks)} threads\n".encode())
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:
        listener.close()
        for c in children.values():
            c.close()
        _child(request, fds, conn)  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {pid}\n".encode())
    return pid


def _child(request: dict, fds: list[int], conn: socket.socket) -> None:
    import random
    import runpy
    import threading
    import traceback

    conn.close()
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (devnull, *fds):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()  # a fresh interpreter's seeds, not the zygote's
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    argv = request["argv"][1:]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = request["cwd"]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = argv
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # as the interpreter waits for non-daemon threads
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


if __name__ == "__main__":
    _serve(sys.argv[1])
