"""The errors users see, each a message that names the thing and the fix, and `exit_code`,
which every entry point's main() uses to turn them into one `error:` line and an exit code:
`FedMPTError` (bad input) 2, `RunFailed` (training broke) 1, `Interrupted` (Ctrl-C) 130;
anything else is a bug and keeps its traceback. Every entry point imports it, so an
interpreter older than the one this code is tested on (MINIMUM_PYTHON, also pyproject.toml's
requires-python) stops here with one line.
"""
import platform
import sys

MINIMUM_PYTHON = (3, 11)  # the oldest Python the suite runs on (pyproject.toml's requires-python)
if sys.version_info < MINIMUM_PYTHON:
    print(f"error: fedmpt needs Python {'.'.join(map(str, MINIMUM_PYTHON))} or newer; this is "
          f"{platform.python_version()} ({sys.executable}).", file=sys.stderr)
    sys.exit(2)


class FedMPTError(Exception):
    """Bad input (an option, a file on disk, an answer from a server) the user can act on."""


class RunFailed(Exception):
    """Training broke (out of memory, a bug in a client update): the run stops, its last
    checkpoint stays, and `--resume` continues once the cause is fixed."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped a run: the message names what was kept and how to go on."""


EXIT_CODES = {FedMPTError: 2, RunFailed: 1, Interrupted: 130}


def exit_code(command, *args) -> int:
    """Every entry point's one mapping from how `command(*args)` ended to the exit code:
    0 done, 2 bad input, 1 training broke, 130 interrupted (each with one `error:` line);
    anything else is a bug and keeps its traceback."""
    try:
        command(*args)
    except tuple(EXIT_CODES) as error:
        print(f"error: {error}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES.items() if isinstance(error, kind))
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    return 0
