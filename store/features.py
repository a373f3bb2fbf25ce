"""The feature store: a split's frozen inputs, encoded once per key and kept on disk.

`store_key` names what the inputs depend on (backbone weights, images, labels, preprocessing,
input kind; not the seed or the method), `encode_dataset` encodes what the store lacks and
returns the inputs memory-mapped from CACHE/features/<sha256 of the key>/ (`cache_root`).
What it serves is checked first: every file's .npy header against the manifest, and every
chunk's bytes against the CRC-32 the manifest recorded when it was written (a full read of the
entry: docs/scale.md gives the cost); an entry that fails is encoded again, with a note. A
chunk the encoder gave non-finite values is never stored. The store follows no link it did not
create: an entry directory, lock file or input file planted as a symbolic link is refused with an
error naming it (exit 2), and what the link points to is never opened.
"""
import fcntl
import hashlib
import json
import os
import tokenize
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import FedMPTError
from store.files import create_new, refuse_link, write_json


def cache_root(cache_dir: str = "") -> Path:
    """--cache-dir, else $FEDMPT_CACHE, else ~/.cache/fedmpt."""
    return Path(cache_dir or os.environ.get("FEDMPT_CACHE") or Path.home() / ".cache" / "fedmpt").expanduser()


def store_key(backbone_sha256, dataset, kind: str) -> dict:
    """What the frozen inputs of a split depend on, and nothing else (not the seed or method).
    Its images: sha256 of each image's path, size, modification time, status-change time and
    inode, and of the targets, which changes when an image file or a label does. Replacing a
    file, or writing into it, changes its status-change time (and a replacement its inode) even
    when its size and modification time are kept; the bytes themselves are not hashed (a
    dataset's images can be many gigabytes)."""
    files = []
    for path in dataset.images:
        try:
            status = os.stat(path)
            files.append((str(Path(path).resolve()), status.st_size, status.st_mtime_ns, status.st_ctime_ns,
                          status.st_ino))
        except OSError:  # not a file (a test's in-memory image) or missing: reading it will say so
            files.append((str(Path(path).resolve()), None, None, None, None))
    digest = hashlib.sha256(json.dumps(files).encode())
    digest.update(dataset.targets.numpy().tobytes())
    return {"backbone_sha256": backbone_sha256, "dataset": dataset.name, "split": dataset.split,
            "images": digest.hexdigest(), "preprocessing": repr(dataset.transform), "inputs": kind}


def as_stored(outputs) -> list:
    """uint8 stays uint8 (pixels); everything else is kept in float16."""
    return [x.detach().cpu().numpy() if x.dtype == torch.uint8 else x.detach().to("cpu", torch.float16).numpy()
            for x in outputs]


@torch.no_grad()
def encode_dataset(encode, dataset, key=None, cache_dir="", batch_size=64, device="cpu", workers=0, log=print):
    """`encode(images)` (a method's frozen inputs, e.g. FedMPT's v (B, D) and P (B, N, D)) of
    every image, in float16 (uint8 pixels stay uint8). With a `key` (store_key) they live in the feature store:
    CACHE/features/<sha256 of the key>/ holds one .npy per input, written chunk by chunk, and
    manifest.json (the key, shapes, rows completed, file sizes, each chunk's CRC-32); an
    interrupted encoding resumes from its last chunk, a second run with the same key encodes
    nothing, two at once take turns (a lock; the waiting one says so), and files that do not
    match their manifest (sizes, headers, checksums) are encoded again. Returns (tensors
    (n_images, ...) memory-mapped from the store, or in memory without a key; images encoded now)."""
    n = len(dataset)
    progress = lambda start: tqdm(total=n, initial=start, unit="img", leave=False,
                                  desc=f"encode {getattr(dataset, 'name', 'images')} {getattr(dataset, 'split', '')}")
    if key is None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        parts, bar = [], progress(0)
        for images, _ in batches(loader):
            parts.append(as_stored(encode(images.to(device))))
            bar.update(len(images))
        bar.close()
        return tuple(torch.from_numpy(np.concatenate(column)) for column in zip(*parts)), n
    directory = store_directory(key, cache_dir)
    with open_lock(directory) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a second run with this key waits, then reads
            log(f"waiting for another run that encodes the same inputs (it holds {directory / '.lock'})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(directory, key, n, log)
        start = manifest["rows_completed"] if manifest else 0
        arrays = [np.lib.format.open_memmap(directory / f"input{i}.npy", mode="r+")
                  for i in range(len(manifest["shapes"]))] if manifest else None
        if start < n:
            subset = torch.utils.data.Subset(dataset, range(start, n))
            loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers,
                                                 pin_memory=str(device).startswith("cuda"))
            bar = progress(start)
            row = start
            for images, _ in batches(loader):
                outputs = as_stored(encode(images.to(device, non_blocking=True)))
                if not all(x.dtype == np.uint8 or np.isfinite(x).all() for x in outputs):
                    raise FedMPTError(f"the frozen encoder gave non-finite values for images {row} to "
                                      f"{row + len(outputs[0]) - 1} of {getattr(dataset, 'name', 'the dataset')} "
                                      "(a broken backbone file, or values beyond float16's range); nothing of them "
                                      "was stored.")
                if arrays is None:  # the first chunk says the shapes
                    manifest = {"key": key, "shapes": [[n, *x.shape[1:]] for x in outputs],
                                "dtypes": [str(x.dtype) for x in outputs], "rows_completed": 0, "chunks": []}
                    files = [directory / f"input{i}.npy" for i in range(len(outputs))]
                    for path in files:  # made here, never through a link someone planted
                        os.close(create_new(path))
                    arrays = [np.lib.format.open_memmap(path, mode="w+", dtype=x.dtype, shape=(n, *x.shape[1:]))
                              for path, x in zip(files, outputs)]
                    for path in files:
                        reserve(path)
                    manifest["sizes"] = [path.stat().st_size for path in files]  # fixed from here on
                for array, x in zip(arrays, outputs):
                    array[row:row + len(x)] = x
                manifest["chunks"].append([row, row + len(outputs[0]), [zlib.crc32(np.ascontiguousarray(x)) for x in outputs]])
                row += len(outputs[0])
                for array in arrays:
                    array.flush()
                manifest["rows_completed"] = row  # after the rows are on disk: a crash loses one chunk
                write_manifest(directory, manifest)
                bar.update(len(outputs[0]))
            bar.close()
        del arrays
        inputs = open_store(key, cache_dir)
    return inputs, n - start


def open_lock(directory: Path):
    """The entry's lock file, opened without following a link (O_NOFOLLOW) and never truncated,
    after checking that neither the entry nor anything in it is a link this code did not create.
    A store the user cannot write is an error naming it and the fix."""
    try:
        for folder in (directory.parent, directory):
            refuse_link(folder)
            folder.mkdir(exist_ok=True, parents=True)
        descriptor = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if os.path.islink(directory / ".lock"):
            refuse_link(directory / ".lock")
        raise FedMPTError(f"cannot use the feature store at {directory}: {error.strerror or error}; give a "
                          "directory you can write with --cache-dir (or $FEDMPT_CACHE).") from None
    for entry in os.scandir(directory):  # every file the entry will open, read or write
        if entry.is_symlink():
            os.close(descriptor)
            refuse_link(Path(entry.path))
    return os.fdopen(descriptor, "r+")


def store_directory(key, cache_dir="") -> Path:
    return cache_root(cache_dir) / "features" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def open_store(key, cache_dir="") -> tuple:
    """The finished store entry of `key`: read-only tensors memory-mapped from disk (pages the
    kernel can drop: host memory does not grow with the dataset). Callers copy before changing."""
    directory = store_directory(key, cache_dir)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        arrays = [np.load(directory / f"input{i}.npy", mmap_mode="r") for i in range(len(manifest["shapes"]))]
    except (OSError, KeyError, *HEADER_ERRORS) as error:
        raise FedMPTError(f"feature store entry {directory} is damaged ({type(error).__name__}: {error}); delete that "
                          "directory and run again: it is encoded again.") from None
    with warnings.catch_warnings():  # torch warns that the arrays are read-only; nothing writes them
        warnings.simplefilter("ignore", UserWarning)
        return tuple(torch.from_numpy(array) for array in arrays)


def reserve(path: Path):
    """Allocate a new store file's blocks now: a disk that fills up later would kill the process
    (SIGBUS on the memory map) with no message."""
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, path.stat().st_size)
        except OSError as error:
            raise FedMPTError(f"no room for the feature store: {path} needs {path.stat().st_size / 2 ** 30:.1f} GiB "
                              f"({error.strerror}); free disk space or pass --cache-dir on a larger disk.") from None


def batches(loader):
    """The loader's batches; an error a worker raised keeps its own message (a DataLoader
    worker's error arrives with the worker's traceback inside its message)."""
    try:
        yield from loader
    except FedMPTError as error:
        raise FedMPTError(str(error).rsplit("FedMPTError: ", 1)[-1].strip()) from None


def read_manifest(directory: Path, key, n, log):
    """The manifest if it and its files fit `key` (else None: start over, saying why)."""
    path = directory / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = [directory / f"input{i}.npy" for i in range(len(manifest["shapes"]))]
        problem = ("another key" if manifest["key"] != key else
                   f"{manifest['shapes'][0][0]} rows, not {n}" if manifest["shapes"][0][0] != n else
                   "a file is missing or has another size" if [f.stat().st_size if f.exists() else -1
                                                               for f in files] != manifest["sizes"] else
                   content_problem(files, manifest))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        problem = f"unreadable manifest ({type(error).__name__})"
    if problem:
        log(f"note: feature store {directory} does not match its manifest ({problem}); encoding again.")
        path.unlink(missing_ok=True)
        return None
    return manifest


HEADER_ERRORS = (ValueError, EOFError, SyntaxError, tokenize.TokenError)  # what np.load raises for a damaged header


def content_problem(files, manifest) -> str:
    """'' when every file's .npy header reads and says the manifest's shape and dtype, the
    recorded chunks cover the rows completed, and every chunk's bytes have the CRC-32 recorded
    when it was written (the whole entry is read, each file opened once)."""
    arrays = []
    for path, shape, dtype in zip(files, manifest["shapes"], manifest["dtypes"]):
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (OSError, *HEADER_ERRORS) as error:
            return f"the header of {path.name} is damaged ({type(error).__name__})"
        found = arrays[-1]
        if list(found.shape) != list(shape) or str(found.dtype) != dtype:
            return f"{path.name} holds {tuple(found.shape)} {found.dtype}, the manifest says {tuple(shape)} {dtype}"
    if "chunks" not in manifest:
        return "it was written before chunks had checksums"
    covered = 0
    for start, end, crcs in manifest["chunks"]:
        if start != covered:
            return f"its chunks skip rows {covered} to {start - 1}"
        for path, array, crc in zip(files, arrays, crcs):
            if zlib.crc32(np.ascontiguousarray(array[start:end])) != crc:
                return f"rows {start} to {end - 1} of {path.name} fail their checksum"
        covered = end
    return "" if covered == manifest["rows_completed"] else f"its chunks cover {covered} of {manifest['rows_completed']} rows"


def write_manifest(directory: Path, manifest: dict):
    """Whole or not at all (store/files.py): a failed write keeps the last chunk's manifest, and
    the same command resumes from it."""
    write_json(directory / "manifest.json", manifest, "run the same command again: it resumes the encoding")
