"""The one error type users see: a message that names the thing and the fix.

`federate.main()` turns a `FedMPTError` into that message and exit code 2, and a `RunFailed`
(training broke) into its message and exit code 1; anything else is a bug and keeps its traceback.
"""


class FedMPTError(Exception):
    """Bad input (an option, a file on disk, an answer from a server) the user can act on."""


class RunFailed(Exception):
    """Training broke (out of memory, a bug in a client update): the run stops, its last
    checkpoint stays, and `--resume` continues once the cause is fixed."""
