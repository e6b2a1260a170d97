"""Run the CLIs as `python -m assim._cli.NAME ...` would, without paying the imports
each time (~3 s of a small CLI test's ~6 s).

`run_cli` sends each run to a per-process server (this file run as a script) that
has imported what the CLIs import, but initialised no JAX backend, and forks one
child per run: the child sets the run's environment, working directory, argv and
standard streams and executes the module as `__main__` (`runpy`), so that exit
codes, tracebacks and interpreter shutdown are those of `python -m`. A run whose
environment differs from the server's in a variable that JAX or XLA may read at
import goes to a plain subprocess instead.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_CLIS = ("run", "train", "data", "simulate")
# Read when JAX/XLA are imported (or may be): a run changing one needs a fresh process.
_IMPORT_TIME_ENV = ("JAX_", "XLA_", "TF_", "CUDA_", "PYTHON")


def _import_time_env(env) -> dict:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV)}


class _Server:
    def __init__(self):
        self.env = dict(os.environ)
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        self.lock = threading.Lock()

    def run(self, module, args, cwd, env, timeout):
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {
                "module": module,
                "argv": [module, *args],
                "cwd": str(cwd),
                "env": env,
                "stdout": str(out),
                "stderr": str(err),
            }
            with self.lock:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
                started = self.process.stdout.readline()
                if not started:
                    raise RuntimeError("the CLI server died (its traceback is above)")
                pid = json.loads(started)["pid"]
                timed_out = threading.Event()
                timer = threading.Timer(timeout, _kill, (pid, timed_out))
                timer.start()
                try:
                    reply = self.process.stdout.readline()
                finally:
                    timer.cancel()
                if not reply:
                    raise RuntimeError("the CLI server died")
                returncode = json.loads(reply)["returncode"]
            stdout, stderr = out.read_text(), err.read_text()
        if timed_out.is_set():
            raise subprocess.TimeoutExpired(request["argv"], timeout, stdout, stderr)
        return subprocess.CompletedProcess(
            [sys.executable, "-m", *request["argv"]], returncode, stdout, stderr
        )


def _kill(pid: int, timed_out: threading.Event) -> None:
    timed_out.set()
    with contextlib.suppress(ProcessLookupError):  # it had just ended
        os.kill(pid, signal.SIGKILL)


_server: _Server | None = None


def run_cli(module: str, *args: str, cwd, env=None, timeout: float = 600):
    """`subprocess.run([python, "-m", module, *args], capture_output=True,
    text=True, cwd=cwd, env=env, timeout=timeout)`, through the server."""
    global _server
    env = dict(os.environ if env is None else env)
    if _server is None or _server.process.poll() is not None:
        _server = _Server()
    if _import_time_env(env) != _import_time_env(_server.env):
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
        )
    return _server.run(module, list(args), cwd, env, timeout)


def _serve():
    import runpy

    modules = [f"assim._cli.{name}" for name in _CLIS]
    for module in modules:  # the CLIs' imports; the CLIs forgotten: runpy runs them
        __import__(module)
    for module in modules:
        del sys.modules[module]
    from jax._src import xla_bridge

    assert not getattr(xla_bridge, "_backends", None), "no JAX backend before fork"
    assert threading.active_count() == 1, "no thread before fork"
    requests, replies = sys.stdin, sys.stdout
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: becomes `python -m module argv...`
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            for fd, path, flags in (
                (0, os.devnull, os.O_RDONLY),
                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            ):
                os.dup2(os.open(path, flags), fd)  # under sys.stdin/out/err
            sys.argv = request["argv"]
            sys.path[0] = request["cwd"]  # `-m` puts the working directory first
            # Exceptions and SystemExit leave from here as from `python -m`.
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            raise SystemExit(0)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}))
        replies.write("\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
