"""Tests for wsss.data.download: never the internet, only 127.0.0.1 and file:// URLs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wsss.data import download as dl
from wsss.data.download import (
    ArchiveSpec,
    ChecksumError,
    DownloadError,
    ExtractError,
    UnsafeArchiveError,
    download,
    get_archive,
    prepare,
    safe_extract,
)

# --------------------------------------------------------------------------------------------
# helpers: archives and a local HTTP server


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **attrs) -> None:
    info = tarfile.TarInfo(name)
    if data is None and "type" not in attrs:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    for k, v in attrs.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    tf.addfile(info, io.BytesIO(data) if data is not None else None)


def make_tar(path: Path, members: list, mode: str = "w") -> Path:
    """``members``: (name, bytes) for files, (name, None) for folders, (name, None, attrs) for others."""
    with tarfile.open(path, mode) as tf:
        for m in members:
            _tar_add(tf, m[0], m[1], **(m[2] if len(m) > 2 else {}))
    return path


def make_zip(path: Path, members: list) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, *rest in members:
            if rest:  # explicit unix mode, e.g. a symlink
                info = zipfile.ZipInfo(name)
                info.create_system = 3
                info.external_attr = rest[0] << 16
                zf.writestr(info, data or b"")
            elif data is None:
                zf.writestr(name if name.endswith("/") else name + "/", b"")
            else:
                zf.writestr(name, data)
    return path


VOC_MEMBERS = [
    ("VOCdevkit", None),
    ("VOCdevkit/VOC2012", None),
    ("VOCdevkit/VOC2012/JPEGImages", None),
    ("VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg", b"jpeg-bytes-1"),
    ("VOCdevkit/VOC2012/JPEGImages/2007_000039.jpg", b"jpeg-bytes-2"),
    ("VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", b"2007_000032\n"),
    ("VOCdevkit/VOC2012/SegmentationClass/2007_000032.png", b"png-bytes"),
]

SBD_MEMBERS = [
    ("SegmentationClassAug/", None),
    ("SegmentationClassAug/2007_000032.png", b"aug-label-1"),
    ("SegmentationClassAug/2007_000039.png", b"aug-label-2"),
    ("__MACOSX/", None),
    ("__MACOSX/SegmentationClassAug/._2007_000032.png", b"apple-double"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        rng = self.headers.get("Range")
        start = 0
        if rng and srv.mode != "ignore_range":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if srv.mode == "no_length":  # body delimited by closing the connection
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "truncate":  # promise the whole body, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    """A local HTTP server; put bytes in ``server.files['/name']``, set ``server.mode``."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.mode = {}, [], "range"
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def refused_url():
    """A URL on a local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.tar"


PAYLOAD = bytes(range(256)) * 4000  # 1 MB, several read chunks


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------------------------
# registry


def test_registry_has_the_published_archives():
    voc = get_archive("voc2012_trainval")
    assert voc.size == 1_999_639_040 and voc.md5 == "6cd6e144f989b92b3379bac3b3de84fd"
    assert voc.filename == "VOCtrainval_11-May-2012.tar"
    sbd = get_archive("sbd_aug")
    assert sbd.url.endswith("?dl=1") and sbd.md5 is None and sbd.sha256 is None
    assert get_archive("coco2014_train").size == 13_510_573_713
    assert get_archive("coco2014_val").md5 == "a3d79f5ed8d289b7a7554ce06a5782b3"
    assert get_archive("coco2014_annotations").md5 == "0a379cfc70b0e71301e0f377548639bd"


def test_get_archive_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as e:
        get_archive("voc2007")
    assert "voc2012_trainval" in str(e.value) and "sbd_aug" in str(e.value)


def test_get_archive_overrides():
    spec = get_archive("voc2012_trainval", url="file:///x.tar", md5="ab", size=3)
    assert (spec.url, spec.md5, spec.size) == ("file:///x.tar", "ab", 3)
    assert spec.filename == "VOCtrainval_11-May-2012.tar"
    assert get_archive("voc2012_trainval", url=None).url.startswith("http://host.robots.ox.ac.uk")


# --------------------------------------------------------------------------------------------
# download


def test_download_http_verifies_and_records_sha256(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "dl" / "a.bin"
    out = download(server.url + "/a.bin", dest, size=len(PAYLOAD), md5=md5(PAYLOAD), progress=False)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "dl" / "a.bin.part").exists()
    assert (tmp_path / "dl" / "a.bin.sha256").read_text().split()[0] == sha256(PAYLOAD)


def test_download_file_url_with_spec(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    spec = ArchiveSpec("x", src.as_uri(), len(PAYLOAD), md5(PAYLOAD), sha256(PAYLOAD), "x.bin")
    dest = download(spec, tmp_path / "x.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_present_file_is_not_downloaded_again(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    download(server.url + "/a.bin", dest, md5=md5(PAYLOAD), progress=False)
    n = len(server.requests)
    download(server.url + "/a.bin", dest, md5=md5(PAYLOAD), progress=False)
    assert len(server.requests) == n


def test_md5_mismatch_names_file_and_keeps_corrupt(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    with pytest.raises(ChecksumError) as e:
        download(server.url + "/a.bin", dest, md5="0" * 32, progress=False)
    msg = str(e.value)
    assert str(dest) in msg and "0" * 32 in msg and md5(PAYLOAD) in msg and "md5" in msg
    assert not dest.exists() and not (tmp_path / "a.bin.part").exists()
    assert (tmp_path / "a.bin.corrupt").read_bytes() == PAYLOAD


def test_size_mismatch_reported_by_server(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    with pytest.raises(ChecksumError) as e:
        download(server.url + "/a.bin", dest, size=len(PAYLOAD) + 1, progress=False)
    assert "size mismatch" in str(e.value) and str(dest) in str(e.value)
    assert str(len(PAYLOAD)) in str(e.value) and not dest.exists()


def test_size_mismatch_after_download(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.mode = "no_length"  # the size is only known once the body has arrived
    dest = tmp_path / "a.bin"
    with pytest.raises(ChecksumError) as e:
        download(server.url + "/a.bin", dest, size=len(PAYLOAD) - 1, progress=False)
    assert "size mismatch" in str(e.value) and str(dest) in str(e.value) and not dest.exists()
    assert (tmp_path / "a.bin.corrupt").stat().st_size == len(PAYLOAD)


def test_short_body_without_length_is_incomplete_and_kept(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.mode = "no_length"
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="incomplete") as e:
        download(server.url + "/a.bin", dest, size=len(PAYLOAD) + 1, progress=False)
    assert not isinstance(e.value, ChecksumError)
    assert (tmp_path / "a.bin.part").stat().st_size == len(PAYLOAD) and not dest.exists()


def test_resume_with_range_request(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:300_000])
    download(server.url + "/a.bin", dest, size=len(PAYLOAD), sha256=sha256(PAYLOAD), progress=False)
    assert server.requests == [("/a.bin", "bytes=300000-")]
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.mode = "ignore_range"
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:300_000])
    download(server.url + "/a.bin", dest, md5=md5(PAYLOAD), progress=False)
    assert server.requests[0][1] == "bytes=300000-"
    assert dest.read_bytes() == PAYLOAD


def test_stale_part_larger_than_file_gets_416_and_restarts(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD + b"junk")
    download(server.url + "/a.bin", dest, md5=md5(PAYLOAD), progress=False)  # size unknown
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_transfer_keeps_part_and_next_run_resumes(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.mode = "truncate"
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError) as e:
        download(server.url + "/a.bin", dest, md5=md5(PAYLOAD), progress=False)
    assert "resume" in str(e.value)
    part = tmp_path / "a.bin.part"
    assert 0 < part.stat().st_size < len(PAYLOAD) and not dest.exists()
    server.mode = "range"
    download(server.url + "/a.bin", dest, md5=md5(PAYLOAD), progress=False)
    assert server.requests[-1][1] == f"bytes={len(PAYLOAD) // 2}-"
    assert dest.read_bytes() == PAYLOAD


def test_connection_refused_is_a_clear_offline_error(refused_url, tmp_path):
    dest = tmp_path / "downloads" / "file.tar"
    with pytest.raises(DownloadError) as e:
        download(refused_url, dest, md5="ab" * 16, timeout=5, progress=False)
    msg = str(e.value)
    assert refused_url in msg and "offline" in msg and str(dest) in msg and "ab" * 16 in msg
    assert not dest.exists()


def test_http_404(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url + "/missing", tmp_path / "m", progress=False)


def test_sha256_trust_on_first_use(server, tmp_path):
    server.files["/sbd.zip"] = PAYLOAD
    dest = tmp_path / "sbd.zip"
    download(server.url + "/sbd.zip", dest, progress=False)  # first use: nothing to check against
    side = tmp_path / "sbd.zip.sha256"
    assert side.read_text() == f"{sha256(PAYLOAD)}  sbd.zip\n"

    # Later runs check the present file against the recorded value.
    download(server.url + "/sbd.zip", dest, progress=False)
    dest.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(ChecksumError) as e:
        download(server.url + "/sbd.zip", dest, progress=False)
    assert str(dest) in str(e.value) and sha256(PAYLOAD) in str(e.value)

    # A re-download after upstream changed is detected too.
    dest.unlink()
    changed = PAYLOAD + b"new"
    server.files["/sbd.zip"] = changed
    with pytest.raises(ChecksumError) as e:
        download(server.url + "/sbd.zip", dest, progress=False)
    assert "sha256" in str(e.value) and not dest.exists()

    # A pinned sha256 overrides the recorded one and replaces it once verified.
    (tmp_path / "sbd.zip.corrupt").unlink()
    download(server.url + "/sbd.zip", dest, sha256=sha256(changed), progress=False)
    assert side.read_text().split()[0] == sha256(changed)


# --------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2")])
def test_extract_tar_any_compression(tmp_path, mode, suffix):
    arc = make_tar(tmp_path / f"voc{suffix}", VOC_MEMBERS, mode)
    marker = safe_extract(arc, tmp_path / "voc12", checksums={"md5": "x"})
    root = tmp_path / "voc12" / "VOCdevkit" / "VOC2012"
    assert (root / "JPEGImages" / "2007_000039.jpg").read_bytes() == b"jpeg-bytes-2"
    assert (root / "ImageSets" / "Segmentation" / "train.txt").read_text() == "2007_000032\n"
    info = json.loads(marker.read_text())
    assert marker == tmp_path / "voc12" / ".complete"
    assert info["archive"] == arc.name and info["size"] == arc.stat().st_size
    assert info["files"] == 4 and info["checksums"] == {"md5": "x"} and "wsss_version" in info
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_extract_zip_skips_macosx_and_merges_into_existing_tree(tmp_path):
    voc = safe_extract(make_tar(tmp_path / "voc.tar", VOC_MEMBERS), tmp_path / "voc12", marker_name=".voc.complete")
    root = tmp_path / "voc12" / "VOCdevkit" / "VOC2012"
    (root / "user_notes.txt").write_text("keep me")
    sbd = safe_extract(
        make_zip(tmp_path / "sbd.zip", SBD_MEMBERS),
        root,
        members_prefix="SegmentationClassAug",
        marker_name=".sbd.complete",
    )
    assert (root / "SegmentationClassAug" / "2007_000039.png").read_bytes() == b"aug-label-2"
    assert not (root / "__MACOSX").exists()
    assert (root / "user_notes.txt").read_text() == "keep me"
    assert (root / "JPEGImages" / "2007_000032.jpg").exists()
    assert voc.exists() and json.loads(sbd.read_text())["skipped"] == 2


def test_extract_merge_order_does_not_matter(tmp_path):
    root = tmp_path / "voc12" / "VOCdevkit" / "VOC2012"
    safe_extract(make_zip(tmp_path / "sbd.zip", SBD_MEMBERS), root, members_prefix="SegmentationClassAug")
    safe_extract(make_tar(tmp_path / "voc.tar", VOC_MEMBERS), tmp_path / "voc12")
    assert (root / "SegmentationClassAug" / "2007_000032.png").exists()
    assert (root / "JPEGImages" / "2007_000032.jpg").exists()


def test_tar_holding_a_zip_is_read_as_tar(tmp_path):
    inner = make_zip(tmp_path / "inner.zip", [("z/a.txt", b"a")]).read_bytes()
    arc = make_tar(tmp_path / "outer.tar", [("pkg/inner.zip", inner)])
    safe_extract(arc, tmp_path / "out")
    assert (tmp_path / "out" / "pkg" / "inner.zip").read_bytes() == inner


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"not an archive" * 100)
    with pytest.raises(ExtractError, match="neither a tar"):
        safe_extract(tmp_path / "x.tar", tmp_path / "out")


def test_members_prefix_matching_nothing_is_an_error(tmp_path):
    arc = make_zip(tmp_path / "sbd.zip", SBD_MEMBERS)
    with pytest.raises(ExtractError, match="no files under"):
        safe_extract(arc, tmp_path / "out", members_prefix="train2014")
    assert listing(tmp_path / "out") == []


UNSAFE_TAR = [
    ("traversal", ("../evil", b"x"), "'..'"),
    ("absolute", ("/tmp/abs_evil", b"x"), "absolute"),
    ("symlink", ("data/link", None, {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}), "symlink"),
    ("hardlink", ("data/hard", None, {"type": tarfile.LNKTYPE, "linkname": "data/ok.txt"}), "hardlink"),
    ("device", ("data/dev", None, {"type": tarfile.CHRTYPE}), "device"),
    ("fifo", ("data/fifo", None, {"type": tarfile.FIFOTYPE}), "fifo"),
]


@pytest.mark.parametrize("kind,member,reason", UNSAFE_TAR, ids=[u[0] for u in UNSAFE_TAR])
def test_unsafe_tar_member_refused_nothing_left(tmp_path, kind, member, reason):
    # Safe members come first, so extraction is under way when the bad one is met.
    arc = make_tar(tmp_path / "bad.tar", [("data", None), ("data/ok.txt", b"ok"), member, ("data/z.txt", b"z")])
    out = tmp_path / "sandbox" / "out"
    with pytest.raises(UnsafeArchiveError) as e:
        safe_extract(arc, out)
    assert member[0] in str(e.value) and reason in str(e.value)
    assert listing(tmp_path / "sandbox") == []  # no marker, no files, no temp folder
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    "member,reason",
    [
        (("../evil", b"x"), "'..'"),
        (("/abs_evil", b"x"), "absolute"),
        (("data/link", b"/etc/passwd", stat.S_IFLNK | 0o777), "symlink"),
    ],
)
def test_unsafe_zip_member_refused_nothing_left(tmp_path, member, reason):
    arc = make_zip(tmp_path / "bad.zip", [("data/ok.txt", b"ok"), member])
    out = tmp_path / "sandbox" / "out"
    with pytest.raises(UnsafeArchiveError, match=reason):
        safe_extract(arc, out)
    assert listing(tmp_path / "sandbox") == []


def test_interrupted_extraction_leaves_no_marker_and_rerun_completes(tmp_path, monkeypatch):
    arc = make_tar(tmp_path / "voc.tar", VOC_MEMBERS)
    out = tmp_path / "voc12"
    (out / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)  # forces a member-wise merge
    real_move, calls = dl._move, []

    def failing_move(src, dst):  # die after the first file has been moved into place
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_move(src, dst)

    monkeypatch.setattr(dl, "_move", failing_move)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(arc, out)
    assert not (out / ".complete").exists()
    assert any(p.is_file() for p in out.rglob("*"))  # half-extracted, but does not look complete
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []

    monkeypatch.setattr(dl, "_move", real_move)
    marker = safe_extract(arc, out)
    assert marker.exists() and json.loads(marker.read_text())["files"] == 4
    assert (out / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000032.png").read_bytes() == b"png-bytes"


def test_failure_while_writing_members_leaves_nothing(tmp_path, monkeypatch):
    arc = make_tar(tmp_path / "voc.tar", VOC_MEMBERS)
    real, n = dl.shutil.copyfileobj, []

    def failing_copy(*a, **k):
        n.append(1)
        if len(n) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(dl.shutil, "copyfileobj", failing_copy)
    with pytest.raises(OSError):
        safe_extract(arc, tmp_path / "sandbox" / "voc12")
    assert listing(tmp_path / "sandbox") == []


def test_rerun_with_marker_is_a_noop(tmp_path, monkeypatch):
    arc = make_tar(tmp_path / "voc.tar", VOC_MEMBERS)
    marker = safe_extract(arc, tmp_path / "voc12")
    before = marker.read_text()
    arc.unlink()  # the archive is not even needed any more
    monkeypatch.setattr(dl, "_iter_members", lambda *a: pytest.fail("extracted again"))
    assert safe_extract(arc, tmp_path / "voc12") == marker and marker.read_text() == before


# --------------------------------------------------------------------------------------------
# prepare and the command line


def test_prepare_end_to_end(server, tmp_path):
    voc = make_tar(tmp_path / "voc.tar", VOC_MEMBERS).read_bytes()
    sbd = make_zip(tmp_path / "sbd.zip", SBD_MEMBERS).read_bytes()
    server.files.update({"/voc.tar": voc, "/sbd.zip": sbd})
    data = tmp_path / "data"

    m_voc = prepare("voc2012_trainval", data, url=server.url + "/voc.tar", size=len(voc), md5=md5(voc), progress=False)
    m_sbd = prepare("sbd_aug", data, url=server.url + "/sbd.zip", progress=False)

    root = data / "voc12" / "VOCdevkit" / "VOC2012"
    assert m_voc == data / "voc12" / ".voc2012_trainval.complete"
    assert m_sbd == root / ".sbd_aug.complete"
    assert (root / "JPEGImages" / "2007_000032.jpg").exists()
    assert (root / "SegmentationClassAug" / "2007_000032.png").exists()
    assert not (root / "__MACOSX").exists()
    assert (data / "downloads" / "VOCtrainval_11-May-2012.tar").read_bytes() == voc
    info = json.loads(m_voc.read_text())
    assert info["checksums"] == {"md5": md5(voc), "sha256": sha256(voc)}
    assert json.loads(m_sbd.read_text())["checksums"] == {"sha256": sha256(sbd)}  # trust on first use

    n = len(server.requests)
    assert prepare("sbd_aug", data, url=server.url + "/sbd.zip", progress=False) == m_sbd
    assert len(server.requests) == n


def test_prepare_coco_layout_with_file_urls(tmp_path):
    data = tmp_path / "data"
    for name, top in [
        ("coco2014_train", "train2014"),
        ("coco2014_val", "val2014"),
        ("coco2014_annotations", "annotations"),
    ]:
        arc = make_zip(tmp_path / f"{top}.zip", [(f"{top}/", None), (f"{top}/f.bin", top.encode())])
        raw = arc.read_bytes()
        prepare(name, data, url=arc.as_uri(), size=len(raw), md5=md5(raw), progress=False)
        assert (data / "coco14" / top / "f.bin").read_bytes() == top.encode()
        assert (data / "coco14" / f".{name}.complete").exists()


def test_cli_error_exit_code_and_message(refused_url, tmp_path, capsys):
    rc = dl.main(
        ["voc2012_trainval", "--data-dir", str(tmp_path), "--url", refused_url, "--timeout", "5", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "offline" in err and refused_url in err
    assert str(tmp_path / "downloads" / "VOCtrainval_11-May-2012.tar") in err


def test_cli_subprocess(server, tmp_path):
    sbd = make_zip(tmp_path / "sbd.zip", SBD_MEMBERS).read_bytes()
    server.files["/sbd.zip"] = sbd
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def cli(data_dir, *extra):
        cmd = [
            sys.executable,
            "-m",
            "wsss.data.download",
            "sbd_aug",
            "--data-dir",
            str(data_dir),
            "--url",
            server.url + "/sbd.zip",
            "--no-progress",
            *extra,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, env=env)

    ok = cli(tmp_path / "d")
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()) == tmp_path / "d" / "voc12" / "VOCdevkit" / "VOC2012" / ".sbd_aug.complete"

    bad = cli(tmp_path / "e", "--md5", "0" * 32)
    assert bad.returncode == 1 and "md5 mismatch" in bad.stderr and "SegmentationClassAug.zip" in bad.stderr
    assert bad.stderr.count("\n") == 1  # one line, no traceback


def test_cli_unknown_name_lists_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dl.main(["voc2007", "--data-dir", str(tmp_path)])
    assert e.value.code == 2 and "sbd_aug" in capsys.readouterr().err
