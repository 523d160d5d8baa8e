"""Downloads against a local HTTP server on 127.0.0.1: a good archive, a wrong checksum, an
HTML page, a truncated file, a connection dropped mid-way then resumed; and files on disk
(Omniglot's zips among them) that are refused in one line without being deleted."""

import hashlib
import http.server
import io
import random
import tarfile
import threading
import typing
import zipfile

import pytest

from metatrain.data import download as dl
from metatrain.data import omniglot
from metatrain.errors import MetatrainError


def archive_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        payload = random.Random(0).randbytes(dl.CHUNK + 12345)  # incompressible: spans chunks
        info = tarfile.TarInfo("data/blob")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


GOOD = archive_bytes()
HTML = b"<!DOCTYPE html>\n<html><body>Google Drive: quota exceeded</body></html>\n"


class Handler(http.server.BaseHTTPRequestHandler):
    drops_left = 0  # how many more /drop requests are cut off half-way
    ranges: typing.ClassVar[list[str]] = []  # the Range header of each request

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.ranges.append(self.headers.get("Range", ""))
        body, kind = GOOD, "application/gzip"
        if self.path == "/html":
            body, kind = HTML, "text/html; charset=utf-8"
        elif self.path == "/short":
            body = GOOD[: len(GOOD) // 3]
        elif self.path == "/wrong":
            body = GOOD[:-1] + bytes([GOOD[-1] ^ 1])
        start = 0
        if self.headers.get("Range") and self.path != "/html":
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path == "/drop" and Handler.drops_left > 0:
            Handler.drops_left -= 1
            self.wfile.write(body[start : start + len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection dies mid-file
            return
        self.wfile.write(body[start:])


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def remote(server, path="/good", size=-1):
    return dl.Remote(
        f"{server}{path}", hashlib.md5(GOOD).hexdigest(), len(GOOD) if size == -1 else size
    )


def one_line(fn, *fragments) -> str:
    with pytest.raises(MetatrainError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    print(message)  # the closing note quotes these lines (pytest -s)
    return message


def test_good_download_is_verified_and_atomic(server, tmp_path):
    dest = tmp_path / "sub" / "archive.tgz"
    assert dl.fetch(remote(server), dest) == dest
    assert dest.read_bytes() == GOOD
    assert not list(dest.parent.glob("*.part"))
    Handler.ranges.clear()
    dl.fetch(remote(server), dest)  # present and right: nothing fetched
    assert Handler.ranges == []


def test_wrong_checksum_is_refused_and_nothing_kept(server, tmp_path):
    dest = tmp_path / "archive.tgz"
    one_line(lambda: dl.fetch(remote(server, "/wrong"), dest), "has md5", "expected", str(dest))
    assert not dest.exists() and not dest.with_name("archive.tgz.part").exists()


def test_html_page_is_refused_before_anything_is_written(server, tmp_path):
    dest = tmp_path / "archive.tgz"
    one_line(lambda: dl.fetch(remote(server, "/html"), dest), "HTML page", "by hand", str(dest))
    assert not dest.exists() and not dest.with_name("archive.tgz.part").exists()


def test_truncated_file_is_named_truncated(server, tmp_path):
    dest = tmp_path / "archive.tgz"
    one_line(lambda: dl.fetch(remote(server, "/short"), dest), "truncated", str(len(GOOD)))
    assert not dest.exists()
    # Without a known size the checksum still refuses it.
    one_line(lambda: dl.fetch(remote(server, "/short", size=None), dest), "has md5")


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "archive.tgz"
    part = dest.with_name("archive.tgz.part")
    Handler.drops_left, Handler.ranges[:] = 1, []
    one_line(lambda: dl.fetch(remote(server, "/drop"), dest), "run again to resume", str(part))
    assert not dest.exists() and 0 < part.stat().st_size < len(GOOD)
    kept = part.stat().st_size
    assert dl.fetch(remote(server, "/drop"), dest).read_bytes() == GOOD
    assert Handler.ranges == ["", f"bytes={kept}-"]
    assert not part.exists()


def test_no_server_is_one_line(tmp_path):
    r = dl.Remote("http://127.0.0.1:9/nothing.tgz", "0" * 32)
    one_line(lambda: dl.fetch(r, tmp_path / "x.tgz"), "download failed", "by hand")


@pytest.mark.parametrize("bad", ["html", "short", "wrong"])
def test_bad_file_on_disk_is_refused_and_kept(server, tmp_path, bad):
    dest = tmp_path / "archive.tgz"
    body = {"html": HTML, "short": GOOD[:1000], "wrong": GOOD[:-1] + bytes([GOOD[-1] ^ 1])}[bad]
    dest.write_bytes(body)
    fragment = {"html": "HTML page", "short": "truncated", "wrong": "has md5"}[bad]
    one_line(lambda: dl.fetch(remote(server), dest), fragment, "nothing was deleted", server)
    assert dest.read_bytes() == body


def omniglot_zip(path, images=2):
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(images):
            zf.writestr(f"{path.stem}/Alpha/character01/{i}_01.png", bytes(range(200)) * 50)


@pytest.mark.parametrize("bad", ["truncated", "html"])
def test_broken_omniglot_zip_on_disk_is_one_line(tmp_path, bad):
    root = tmp_path / "omniglot"
    (root / "omniglot-py").mkdir(parents=True)
    for part in omniglot.PARTS:
        omniglot_zip(root / "omniglot-py" / f"{part}.zip")
    zpath = root / "omniglot-py" / "images_background.zip"
    body = zpath.read_bytes()[:3000] if bad == "truncated" else HTML
    zpath.write_bytes(body)
    one_line(
        lambda: omniglot.load_omniglot_images(root, 28, download=False),
        str(zpath),
        "HTML page" if bad == "html" else "truncated or corrupt",
        omniglot.URLS["images_background"],
    )
    assert zpath.read_bytes() == body
