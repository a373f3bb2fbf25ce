"""Processes a command starts and must stop again. flower_app.py starts a SuperLink, SuperNodes
and `flwr run` with these; none outlives the run, whichever of them dies first.

Parent links alone cannot find them all: Flower's components start children in sessions of their
own, and a child whose parent died (a SuperLink killed mid-run) is re-parented to PID 1, where no
parent link leads. Its environment stays, though: every process a launch starts carries a token
(FEDMPT_LAUNCH=<random hex>) that all its descendants inherit, and `stop_processes` signals every
process that holds it, as well as every descendant of the ones started.
"""
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

TOKEN_VARIABLE = "FEDMPT_LAUNCH"


def new_token() -> str:
    return uuid.uuid4().hex


def start(command, log_path: Path, env, processes: list):
    """A process in a session of its own (so its whole group can be signalled), output to a log."""
    with open(log_path, "w") as log:
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))


def accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def free_ports(n: int) -> list:
    """n ports free on 127.0.0.1 at this moment. Nothing can hold a port for another process, so
    one may be taken before it is used: the caller retries when a component cannot bind."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a component's log, for an error message."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_tree(pids) -> list:
    """The pids and all their descendants, from the parent links in /proc."""
    children = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], list(pids)
    while todo:
        tree.append(pid := todo.pop())
        todo.extend(children.get(pid, []))
    return tree


def tagged(token: str) -> list:
    """Every process whose environment holds FEDMPT_LAUNCH=token, wherever it was re-parented
    (other users' processes cannot be read, and cannot hold our token)."""
    marker = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def stop_processes(processes, token: str = "", grace=5.0):
    """SIGTERM every process that holds the token and every descendant of the started ones (and
    their process groups), wait up to `grace` seconds, then SIGKILL what is left; reap."""
    ours = {os.getpid(), os.getpgrp()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # a Popen that has been reaped (poll() is not None) may have a reused pid: left out
        started = [p.pid for p in processes if p.poll() is None]
        targets = (set(process_tree(started)) | set(tagged(token) if token else ())) - ours
        groups = set()
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        for group in groups - ours:  # never our own group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        for pid in targets:  # one in another group (or in ours) gets the signal itself
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline:
            for process in processes:
                process.poll()  # reaps our own children, which would otherwise stay zombies
            if not [pid for pid in targets | set(tagged(token) if token else ()) if alive(pid)]:
                break
            time.sleep(0.1)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1)
