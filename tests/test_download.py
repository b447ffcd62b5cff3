"""Tests for sepsis_sc.download against a local HTTP server (no internet needed)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from sepsis_sc.download import (
    UNPACK_MARKER,
    ChecksumError,
    DownloadError,
    archive_stem,
    download,
    download_plan,
    https_url,
    parse_checksum,
    unpack_archive,
    url_filename,
)
from sepsis_sc.download import fetch as download_module

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB of non-HTML bytes
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
FAST = {"backoff": 0.0, "timeout": 5, "chunk_size": 64 * 1024}


class _Handler(BaseHTTPRequestHandler):
    """Serves the behaviours the download code must cope with, keyed by URL path."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        path = self.path.split("?")[0]
        with server.lock:
            server.hits[path] = server.hits.get(path, 0) + 1
            hit = server.hits[path]
            server.ranges.setdefault(path, []).append(self.headers.get("Range"))
        body = server.files.get(path, PAYLOAD)
        if path == "/missing.mtx.gz":
            return self._send(404, b"not found", "text/plain")
        if path == "/forbidden.mtx.gz":
            return self._send(403, b"forbidden", "text/plain")
        if path == "/landing.tar":
            return self._send(200, b"<html><body>Sign in</body></html>", "text/html; charset=utf-8")
        if path == "/sniffed.tar":
            return self._send(
                200, b"\n  <!DOCTYPE html><html>login</html>", "application/octet-stream"
            )
        if path == "/flaky.bin" and hit <= 2:
            return self._send(500, b"try later", "text/plain")
        if path == "/always500.bin":
            return self._send(503, b"down", "text/plain")
        if path in ("/drop.bin", "/drop-norange.bin") and hit == 1:
            # Promise the whole file, send a third of it, then hang up.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return None
        honour_range = path != "/drop-norange.bin"
        rng = self.headers.get("Range")
        if rng and honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                return self._send(416, b"", "text/plain")
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])
            return None
        return self._send(200, body, "application/octet-stream")

    def _send(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.hits, httpd.ranges, httpd.files = {}, {}, {}
    httpd.lock = threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _leftovers(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(dest.name + "*"))


def test_download_verifies_sha256_and_md5_and_writes_sidecar(server, tmp_path):
    dest = tmp_path / "sub" / "GSM1_matrix.mtx.gz"
    out = download(f"{server.base}/data.bin", dest, checksum=f"sha256:{SHA}", **FAST)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not dest.with_name(dest.name + ".part").exists()
    assert dest.with_name(dest.name + ".sha256").read_text().split()[0] == SHA
    dest2 = tmp_path / "md5.bin"
    download(f"{server.base}/data.bin", dest2, checksum=f"md5:{MD5.upper()}", **FAST)
    assert dest2.read_bytes() == PAYLOAD


def test_checksum_mismatch_raises_quoting_both_sums_and_leaves_nothing(server, tmp_path):
    server.files["/corrupt.bin"] = PAYLOAD[:-1] + b"X"
    dest = tmp_path / "corrupt.bin"
    url = f"{server.base}/corrupt.bin"
    with pytest.raises(ChecksumError) as err:
        download(url, dest, checksum=f"sha256:{SHA}", **FAST)
    msg = str(err.value)
    assert SHA in msg and hashlib.sha256(server.files["/corrupt.bin"]).hexdigest() in msg
    assert url in msg
    assert _leftovers(dest) == []


@pytest.mark.parametrize(("name", "status"), [("missing.mtx.gz", 404), ("forbidden.mtx.gz", 403)])
def test_client_errors_name_url_and_status_without_retrying(server, tmp_path, name, status):
    url = f"{server.base}/{name}"
    dest = tmp_path / name
    with pytest.raises(DownloadError, match=str(status)) as err:
        download(url, dest, retries=3, **FAST)
    assert url in str(err.value)
    assert server.hits[f"/{name}"] == 1
    assert _leftovers(dest) == []


@pytest.mark.parametrize("name", ["landing.tar", "sniffed.tar"])
def test_html_page_instead_of_data_is_rejected(server, tmp_path, name):
    url = f"{server.base}/{name}"
    dest = tmp_path / name
    with pytest.raises(DownloadError, match="HTML") as err:
        download(url, dest, **FAST)
    assert url in str(err.value)
    assert _leftovers(dest) == []


def test_html_is_accepted_when_an_html_file_is_expected(server, tmp_path):
    dest = download(f"{server.base}/landing.tar", tmp_path / "page.html", **FAST)
    assert dest.read_bytes().startswith(b"<html>")


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    dest = tmp_path / "drop.bin"
    download(f"{server.base}/drop.bin", dest, checksum=f"sha256:{SHA}", **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/drop.bin"] == 2
    resumed_from = server.ranges["/drop.bin"][1]
    assert resumed_from is not None and resumed_from != "bytes=0-"


def test_dropped_connection_restarts_cleanly_when_range_is_ignored(server, tmp_path):
    dest = tmp_path / "drop-norange.bin"
    download(f"{server.base}/drop-norange.bin", dest, checksum=f"sha256:{SHA}", **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/drop-norange.bin"] == 2


def test_existing_partial_file_is_resumed(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD[:1000])
    download(f"{server.base}/data.bin", dest, checksum=f"sha256:{SHA}", **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges["/data.bin"] == ["bytes=1000-"]


def test_server_errors_are_retried_then_succeed(server, tmp_path):
    dest = download(f"{server.base}/flaky.bin", tmp_path / "flaky.bin", retries=3, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.hits["/flaky.bin"] == 3


def test_retries_are_bounded_and_the_error_names_the_url(server, tmp_path):
    url = f"{server.base}/always500.bin"
    with pytest.raises(DownloadError, match="after 3 attempts") as err:
        download(url, tmp_path / "x.bin", retries=2, **FAST)
    assert url in str(err.value) and "503" in str(err.value)
    assert server.hits["/always500.bin"] == 3


def test_verified_file_is_not_fetched_again(server, tmp_path):
    url = f"{server.base}/data.bin"
    dest = tmp_path / "data.bin"
    download(url, dest, checksum=f"sha256:{SHA}", **FAST)
    download(url, dest, checksum=f"sha256:{SHA}", **FAST)  # checksum verifies
    download(url, dest, **FAST)  # sidecar verifies
    assert server.hits["/data.bin"] == 1
    dest.write_bytes(b"tampered")  # no longer matches the sidecar: fetched again
    download(url, dest, **FAST)
    assert server.hits["/data.bin"] == 2 and dest.read_bytes() == PAYLOAD


def _tar_bytes(files: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GEO_FILES = {
    f"GSM51029{i:02d}_{s}_{kind}": f"{s}-{kind}".encode()
    for i, s in enumerate(["HC1", "S1_T0"])
    for kind in ("barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz")
}


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_geo_raw_tar_downloads_and_unpacks_into_per_sample_files(server, tmp_path, suffix):
    server.files["/GSE1_RAW" + suffix] = _tar_bytes(GEO_FILES, compress=suffix == ".tar.gz")
    archive = download(f"{server.base}/GSE1_RAW{suffix}", tmp_path / f"GSE1_RAW{suffix}", **FAST)
    outdir = tmp_path / archive_stem(archive)
    paths = unpack_archive(archive, outdir)
    assert sorted(p.name for p in paths) == sorted(GEO_FILES)
    for name, data in GEO_FILES.items():
        assert (outdir / name).read_bytes() == data
    assert (outdir / UNPACK_MARKER).is_file()


def test_unpack_marker_distinguishes_finished_from_half_unpacked(tmp_path):
    archive = tmp_path / "GSE1_RAW.tar"
    archive.write_bytes(_tar_bytes(GEO_FILES))
    outdir = tmp_path / "GSE1_RAW"
    unpack_archive(archive, outdir)
    some = outdir / next(iter(GEO_FILES))
    some.write_bytes(b"edited")
    unpack_archive(archive, outdir)  # marker present and files there: skipped
    assert some.read_bytes() == b"edited"
    (outdir / UNPACK_MARKER).unlink()  # as if the previous run died mid-way
    unpack_archive(archive, outdir)
    assert some.read_bytes() == GEO_FILES[some.name]


def test_unpack_selected_members_and_report_missing_ones(tmp_path):
    archive = tmp_path / "GSE1_RAW.tar"
    archive.write_bytes(_tar_bytes(GEO_FILES))
    wanted = ["GSM5102900_HC1_matrix.mtx.gz"]
    paths = unpack_archive(archive, tmp_path / "out", members=wanted)
    assert [p.name for p in paths] == wanted
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*wanted, UNPACK_MARKER])
    with pytest.raises(ValueError, match="GSM5102900_HC1_barcodes.tsv.gz"):
        unpack_archive(archive, tmp_path / "out2", members=["GSM9_typo_matrix.mtx.gz"])


def test_unpack_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_tar_bytes({"ok.txt": b"ok", "../escaped.txt": b"pwned"}))
    with pytest.raises(ValueError, match="unsafe member"):
        unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out" / "ok.txt").exists()


def test_helpers_validate_input():
    assert parse_checksum("SHA256:" + SHA.upper()) == ("sha256", SHA)
    for bad in ("sha256:abc", "crc32:" + "0" * 8, SHA):
        with pytest.raises(ValueError, match="sha256:<64 hex digits>"):
            parse_checksum(bad)
    geo = "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE167nnn/GSE167363/suppl/GSE167363_RAW.tar"
    assert url_filename(geo) == "GSE167363_RAW.tar"
    assert url_filename("https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSE1&format=file") == (
        "GSE1_RAW.tar"
    )
    assert url_filename("https://zenodo.org/records/1/files/a%20b.h5ad?download=1") == "a b.h5ad"
    assert archive_stem("x/GSE1_RAW.tar.gz") == "GSE1_RAW" and archive_stem("a.tgz") == "a"
    with pytest.raises(ValueError, match="not a supported archive"):
        archive_stem("matrix.mtx.gz")
    with pytest.raises(ValueError, match="http"):
        download("ftp://example.org/x", "x")


def test_nested_per_sample_archives_are_unpacked(tmp_path):
    inner = _tar_bytes({"H001/matrix.mtx.gz": b"m", "H001/barcodes.tsv.gz": b"b"}, compress=True)
    archive = tmp_path / "GSE2_RAW.tar"
    archive.write_bytes(_tar_bytes({"GSM1_H001.tar.gz": inner}))
    out = tmp_path / "GSE2_RAW"
    flat = unpack_archive(archive, out)
    assert [p.name for p in flat] == ["GSM1_H001.tar.gz"]
    files = unpack_archive(archive, tmp_path / "GSE2_nested", nested=True)
    target = tmp_path / "GSE2_nested" / "GSM1_H001" / "H001" / "matrix.mtx.gz"
    assert target in files and target.read_bytes() == b"m"
    assert (tmp_path / "GSE2_nested" / "GSM1_H001" / UNPACK_MARKER).is_file()


def _sheet(rows):
    cols = ["sample_id", "path", "url", "checksum", "archive_url", "archive_checksum"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols).fillna("")


GEO_TAR = "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE167nnn/GSE167363/suppl/GSE167363_RAW.tar"


def test_download_plan_groups_archives_and_direct_files():
    sheet = _sheet(
        [
            ("A", "data/downloads/GSE167363_RAW/GSM1_A_matrix.mtx.gz", "", "", GEO_TAR, ""),
            ("B", "data/downloads/GSE167363_RAW/GSM2_B_matrix.mtx.gz", "", "", GEO_TAR, ""),
            ("C", "data/downloads/x/C.txt.gz", "https://h.org/C.txt.gz", f"sha256:{SHA}", "", ""),
            ("D", "local/D.h5", "", "", "", ""),
        ]
    )
    plan = download_plan(sheet, "data/downloads/")
    assert set(plan.files) == {"GSE167363_RAW.tar", "x/C.txt.gz"}
    assert plan.files["x/C.txt.gz"].checksum == f"sha256:{SHA}"
    assert list(plan.archives) == ["GSE167363_RAW"]
    assert plan.archive_path("GSE167363_RAW") == "data/downloads/GSE167363_RAW.tar"
    assert plan.archive_outputs("GSE167363_RAW") == list(sheet["path"][:2])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("A", "elsewhere/a.gz", "https://h.org/a.gz", "", "", ""), "not under the download"),
        (("A", "data/downloads/a.gz", "", "", GEO_TAR, ""), "inside the unpacked archive"),
        (("A", "data/downloads/a.gz", "https://h.org/a", "", GEO_TAR, ""), "both 'url' and"),
        (("A", "data/downloads/a.gz", "https://h.org/a", "md5:12", "", ""), "md5:<32 hex"),
        (("A", "data/downloads/a.gz", "gopher://h.org/a", "", "", ""), "only http"),
    ],
)
def test_download_plan_rejects_bad_rows_naming_the_sample(row, message):
    with pytest.raises(ValueError, match=message) as err:
        download_plan(_sheet([row]), "data/downloads")
    assert "'A'" in str(err.value) or "gopher" in str(err.value) or "md5" in str(err.value)


def test_ftp_urls_of_https_mirrors_are_fetched_over_https():
    assert (
        https_url("ftp://ftp.ncbi.nlm.nih.gov/geo/x.tar")
        == "https://ftp.ncbi.nlm.nih.gov/geo/x.tar"
    )
    with pytest.raises(ValueError, match="https"):
        https_url("ftp://example.org/x.tar")


COHORTS = sorted((Path(__file__).resolve().parents[1] / "config" / "cohorts").glob("*/config.yaml"))


@pytest.mark.parametrize("config_path", COHORTS, ids=[p.parent.name for p in COHORTS])
def test_cohort_configs_validate_and_fetch_every_input(config_path, repo_root, monkeypatch):
    from sepsis_sc.config import load_config, load_samples, validate_samples

    monkeypatch.chdir(repo_root)
    config = load_config(config_path)
    assert config["run_name"] == config_path.parent.name
    # config/config.yaml is loaded first by the Snakefile; cohorts must switch the simulator off
    assert config["demo"]["simulate"] is False
    samples = validate_samples(load_samples(config["samples"]), config)
    plan = download_plan(samples, config["download"]["dir"])
    planned = {f"{plan.download_dir}/{name}" for name in plan.files}
    planned |= {p for stem in plan.archives for p in plan.archive_outputs(stem)}
    assert set(samples["path"]) <= planned, "every sample is downloaded or unpacked"


class _FakeResponse:
    def __init__(self, status, headers=None):
        self.status_code, self.reason, self.headers = status, "r", headers or {}


def test_attempt_steps_status_and_resume(tmp_path):
    part = tmp_path / "f.part"
    part.write_bytes(b"abc")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_module._check_status(_FakeResponse(404), "https://x/f", 0, part)
    with pytest.raises(download_module._Retryable):
        download_module._check_status(_FakeResponse(503), "https://x/f", 0, part)
    download_module._check_status(_FakeResponse(206), "https://x/f", 3, part)  # fine
    state = {"hashers": {"sha256": hashlib.new("sha256")}}
    old = state["hashers"]["sha256"]
    ok = _FakeResponse(206, {"Content-Range": "bytes 3-9/10"})
    assert download_module._resume_or_restart(ok, "https://x/f", 3, part, state) == (3, "ab")
    assert state["hashers"]["sha256"] is old  # resumed: hashers keep the bytes in part
    restart = download_module._resume_or_restart(_FakeResponse(200), "u", 3, part, state)
    assert restart == (0, "wb")
    assert state["hashers"]["sha256"] is not old  # restarted: fresh hashers
    with pytest.raises(download_module._Retryable, match="restarting"):
        bad = _FakeResponse(206, {"Content-Range": "bytes 0-9/10"})
        download_module._resume_or_restart(bad, "u", 3, part, state)
    assert not part.exists()
