"""Archive downloads that never fail silently: resumable, checksum-verified, atomic.

`fetch(remote, dest)` returns `dest` once it holds the expected bytes. A download goes to
`dest.part` (kept between runs, so a second run resumes it with an HTTP Range request) and is
renamed onto `dest` only after its md5 matches: `dest` is always absent or whole. Whatever is
wrong (an HTML error page instead of the archive, a file cut short, a wrong checksum) ends in
one MetatrainError line that names the file, what was expected, and the URL to fetch by hand
and where to put it. A file the user put at `dest` is checked the same way and never deleted;
only this module's own `.part` file is removed, and only when resuming it cannot help.
"""

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from metatrain.errors import MetatrainError

CHUNK = 1 << 20
SNIFF = 512  # bytes looked at to tell an HTML page from an archive


@dataclass(frozen=True)
class Remote:
    url: str
    md5: str
    size: int | None = None  # bytes, where known: names a truncated file as such


def looks_like_html(head: bytes) -> bool:
    head = head[:SNIFF].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in head


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def problem_with(path: Path, remote: Remote) -> str | None:
    """Why `path` is not the file `remote` names, or None when it is."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SNIFF)
    if looks_like_html(head):
        return f"is an HTML page ({size} bytes), not the archive"
    if remote.size is not None and size != remote.size:
        cut = "truncated: " if size < remote.size else ""
        return f"is {cut}{size} bytes, expected {remote.size}"
    got = md5_of(path)
    if got != remote.md5:
        return f"has md5 {got}, expected {remote.md5} (truncated or corrupt)"
    return None


def by_hand(remote: Remote, dest: Path) -> str:
    return f"download {remote.url} by hand and put it at {dest}"


def check_file(path: Path, remote: Remote) -> Path:
    """Refuse a file on disk that is not `remote`'s, leaving it where it is."""
    problem = problem_with(path, remote)
    if problem:
        raise MetatrainError(
            f"{path} {problem}; move it away (nothing was deleted) and "
            f"{by_hand(remote, path)}, or let metatrain download it"
        )
    return path


def fetch(remote: Remote, dest: Path, timeout: float = 60) -> Path:
    """`dest`, checked if present, else downloaded into it (resuming an earlier `.part`)."""
    dest = Path(dest)
    if dest.is_file():
        return check_file(dest, remote)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _download(remote, part, timeout)
    except MetatrainError:
        raise
    except (OSError, http.client.HTTPException) as e:  # no network, refused, reset, disk full
        kept = part.stat().st_size if part.is_file() else 0
        resume = f"; run again to resume from byte {kept} ({part})" if kept else ""
        reason = " ".join(str(getattr(e, "reason", e)).split())
        raise MetatrainError(
            f"download failed: {remote.url} ({type(e).__name__}: {reason}){resume}; "
            f"or {by_hand(remote, dest)}"
        ) from None
    problem = problem_with(part, remote)
    if problem:
        part.unlink()  # our own download, complete and wrong: resuming it cannot help
        raise MetatrainError(
            f"downloaded {remote.url} {problem}; removed the download; {by_hand(remote, dest)}"
        )
    os.replace(part, dest)
    return dest


def _download(remote: Remote, part: Path, timeout: float) -> None:
    """Fill `part` with the whole remote file, appending to what an earlier run left."""
    dest = part.with_name(part.name.removesuffix(".part"))
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": "metatrain"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we hold: it is complete, verify it
            return
        raise MetatrainError(
            f"download failed: {remote.url} (HTTP {e.code} {e.reason}); {by_hand(remote, dest)}"
        ) from None
    with response:
        kind = response.headers.get("Content-Type", "")
        first = response.read(SNIFF)
        if "text/html" in kind or looks_like_html(first):
            raise MetatrainError(
                f"{remote.url} answered with an HTML page ({kind or 'no type'}), not the archive "
                f"(md5 {remote.md5}); the link may have moved or need a login: "
                f"{by_hand(remote, dest)}"
            )
        resumed = response.status == 206 and _range_start(response) == have
        expected = response.headers.get("Content-Length")
        expected = int(expected) + (have if resumed else 0) if expected else remote.size
        with open(part, "ab" if resumed else "wb") as f:
            f.write(first)
            try:
                f.writelines(iter(lambda: response.read(CHUNK), b""))
            except http.client.IncompleteRead as e:  # keep what arrived, for the next run
                f.write(e.partial)
            f.flush()
            os.fsync(f.fileno())
    got = part.stat().st_size
    if expected is not None and got < expected:  # the connection ended early
        raise ConnectionError(f"connection closed at byte {got} of {expected}")


def _range_start(response) -> int | None:
    value = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None
