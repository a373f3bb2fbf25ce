"""Files that cannot tear: every file a run keeps (manifest.json, config.json, metrics.json,
checkpoint.pt, state.pt, ...) is written whole to a temporary file beside it, flushed to disk
and renamed over the old one. A failed write (a full disk, a quota) removes the temporary file,
leaves the old file as it was, and stops with an error that names the file, the free space and
the fix (exit 2). Nothing here follows a link it did not create: a symbolic link planted at a
file's name or at its temporary name is refused with an error naming it, and what it points to
is never opened."""
import errno
import io
import json
import os
import shutil
from pathlib import Path

import torch

from errors import FedMPTError

NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_atomic(path, data: bytes, fix: str = ""):
    """`data` as the new content of `path`, all of it or (on any error) none of it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(path, error, fix) from None
    refuse_link(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer process
    try:
        descriptor = create_new(temporary)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)  # on disk before the rename: a crash cannot leave an empty file
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as error:
        if not os.path.islink(temporary):
            temporary.unlink(missing_ok=True)
        raise write_error(path, error, fix) from None


def refuse_link(path: Path):
    """A symbolic link at `path` that this code did not create: FedMPTError naming it."""
    if os.path.islink(path):
        raise FedMPTError(f"{path} is a symbolic link (to {os.readlink(path)}), not a file this code wrote; it is "
                          "left as it is, and so is what it points to. Remove the link and run again.")


def create_new(path: Path, flags: int = os.O_WRONLY) -> int:
    """A descriptor of a new file at `path`, created here (O_EXCL, O_NOFOLLOW): a leftover regular
    file of a crashed writer is removed first, a planted link is refused (refuse_link)."""
    for _ in range(2):
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            refuse_link(path)
            path.unlink(missing_ok=True)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def write_error(path: Path, error: OSError, fix: str) -> FedMPTError:
    kept = f"{path.name} keeps its previous content" if path.exists() else f"{path.name} was not written"
    if error.errno not in NO_ROOM:
        return FedMPTError(f"cannot write {path}: {error.strerror or error} ({kept}); check the directory's "
                           f"permissions{'; ' + fix if fix else ''}.")
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.1f} MiB free on its disk"
    except OSError:
        free = "free space unknown"
    return FedMPTError(f"cannot write {path}: {error.strerror or error} ({free}; {kept}, nothing half-written); "
                       f"free disk space{' and ' + fix if fix else ''}.")


def write_json(path, obj, fix: str = ""):
    write_atomic(path, json.dumps(obj, indent=1).encode(), fix)


def save_tensors(obj, path, fix: str = ""):
    """torch.save of `obj` (tensors, dicts, lists, numbers, strings: what weights_only=True loads)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # in memory first: torch's own writer turns a full disk into a vague error
    write_atomic(path, buffer.getbuffer(), fix)


def save_figure(figure, path, dpi: int):
    """A matplotlib figure as a PNG at `path`, written like every kept file (whole, never through a link)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())
