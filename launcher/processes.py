"""Processes a command starts and must stop again: each in a session of its own, so that its
whole process group (and every descendant, found in /proc) can be signalled. flower_app.py
starts a SuperLink, SuperNodes and `flwr run` with these; none outlives the run."""
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def start(command, log_path: Path, env, processes: list):
    """A process in a session of its own (so its whole group can be signalled), output to a log."""
    with open(log_path, "w") as log:
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))


def accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def process_tree(pids) -> list:
    """The pids and all their descendants, from /proc (Flower's components start children, some
    in sessions of their own)."""
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


def stop_processes(processes, grace=5.0):
    """SIGTERM the process group of every started process and of each descendant, wait, SIGKILL
    what is left, reap: no Flower process outlives the run."""
    groups = set()
    for pid in process_tree([p.pid for p in processes]):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())  # never our own
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        deadline = time.time() + grace
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.time()))
