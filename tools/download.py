"""Downloading VOC2007: both archives, md5-checked, resumable, extracted safely.

    python federate.py --dataset voc2007 --root data/voc2007 --download
"""
import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from loaders.voc import VOC_MD5S, VOC_URLS
from errors import FedMPTError


def download_voc2007(root, progress=True, urls=VOC_URLS, md5s=VOC_MD5S) -> Path:
    """Download and extract both VOC2007 archives into ROOT (giving ROOT/VOCdevkit/VOC2007).
    Per archive: nothing is done if its split is already extracted; an archive already in ROOT
    with the right md5 is used as it is; a partial one is resumed (HTTP Range); the md5 is
    checked; extraction refuses any member that would write outside ROOT. `urls`/`md5s` map
    'trainval' and 'test' to an archive URL and its md5 (tests serve their own)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    directory = root / "VOCdevkit" / "VOC2007"
    for split, url in urls.items():
        if voc_split_complete(directory, split):
            print(f"voc2007 {split}: already in {directory}")
            continue
        archive = root / url.rsplit("/", 1)[-1]
        if archive.exists() and file_md5(archive) == md5s[split]:
            print(f"{archive}: already downloaded")
        else:
            download_file(url, archive, progress)
            if file_md5(archive) != md5s[split]:
                raise FedMPTError(f"{archive} does not have the expected md5 {md5s[split]} (a "
                                  f"corrupt or different file); delete {archive} and run again.")
        safe_extract(archive, root)
        if not voc_split_complete(directory, split):
            raise FedMPTError(f"{archive} did not give a complete VOC2007 {split} split in "
                              f"{directory}; delete {archive} and run again.")
    return directory


def voc_split_complete(directory: Path, split: str) -> bool:
    """True if the split's list exists and every listed image and annotation is there."""
    ids_file = directory / "ImageSets" / "Main" / f"{split}.txt"
    return ids_file.exists() and all(
        (directory / "JPEGImages" / f"{i}.jpg").exists() and (directory / "Annotations" / f"{i}.xml").exists()
        for i in ids_file.read_text().split())


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, path: Path, progress=True):
    """Fetch `url` into `path`. A partial file is resumed with an HTTP Range request; a server
    that ignores it (status 200, not 206) makes us start again from byte 0, and says so."""
    offset = path.stat().st_size if path.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if offset and response.status != 206:
                print(f"{url}: the server does not resume downloads; downloading {path.name} from the start")
                offset = 0
            total = offset + response.length if response.length is not None else None
            with open(path, "ab" if offset else "wb") as file, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=path.name,
                    disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left to fetch: the md5 check judges the file
            return
        raise FedMPTError(f"cannot download {url} (HTTP {error.code} {error.reason}). Download it "
                          f"by hand into {path.parent} and run again.") from None
    except OSError as error:  # URLError, timeouts, resets
        raise FedMPTError(f"cannot download {url} ({error}). Download it by hand into "
                          f"{path.parent} and run again (a partial file there is resumed).") from None


def safe_extract(archive: Path, target: Path):
    """Extract a tar archive into `target`, refusing (before anything is extracted) any member
    that would write outside it once links resolve: an absolute name or '..' that climbs out, a
    device, a symbolic or hard link whose target lies outside, and any member or link target
    whose path passes through a symbolic link of the archive itself (a chain such as `d -> .`,
    `l -> d/..`, `l/x` stays inside each check alone, but writes l/x outside once d and l exist;
    the real VOC archives hold no links). Links already on disk under `target` are resolved
    with realpath. tarfile's 'data' filter (Python >= 3.11.4) is a second line."""
    base = os.path.realpath(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            links = {lexical_path(m.name, set()) for m in members if m.issym()}
            for member in members:
                if unsafe_member(member, base, links):
                    raise FedMPTError(f"{archive}: member '{member.name}' would write outside {target} once its "
                                      "links resolve; nothing was extracted. Delete it and get it again from the "
                                      "official source.")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, members, filter="data")
            else:
                tar.extractall(target, members)
    except (tarfile.TarError, OSError) as error:
        raise FedMPTError(f"cannot extract {archive} ({error}); delete it and run again.") from None


def unsafe_member(member, base: str, archive_links: set) -> bool:
    """True when `member` (or what it links to) lies outside `base`, or reaches it through a
    symbolic link the archive itself creates."""
    if member.name.startswith("/") or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return True
    paths = [member.name]  # relative to base, '/'-separated as in the archive
    if member.issym():
        paths.append(member.linkname if member.linkname.startswith("/") else
                     "/".join([*member.name.split("/")[:-1], member.linkname]))
    elif member.islnk():
        paths.append(member.linkname)
    for path in paths:
        inside = lexical_path(path, archive_links)
        if inside is None or os.path.commonpath([base, os.path.realpath(os.path.join(base, inside))]) != base:
            return True  # the second test: the links already on disk resolve
    return False


def lexical_path(path: str, archive_links: set):
    """`path` with '.' and '..' applied, or None when it is absolute, climbs above the archive's
    root, or goes on past one of `archive_links` (into it, or '..' out of it)."""
    if path.startswith("/"):
        return None
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if parts and "/".join(parts) in archive_links or (part == ".." and not parts):
            return None
        parts.pop() if part == ".." else parts.append(part)
    return "/".join(parts)
