"""Released checkpoints by name: download from a local HTTP server (never the internet), resume,
size and checksum checks, the cache, and the one-line error without a network."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_convert import NUM_CLASSES, reference_outputs, tiny_tf_checkpoint

import simclrv2
from simclrv2 import released
from simclrv2.checkpoint import CheckpointError
from simclrv2.cli import main as cli_main
from simclrv2.convert_command import main as convert_main


class ReleaseServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) like Cloud Storage: Range requests, x-goog-hash md5.

    ``cut``: URL path -> byte count after which the next response for it stops (the connection
    closes, as a dropped download does); ``md5``: URL path -> the digest to announce instead of the
    served bytes' own (bytes corrupted on the way).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.md5: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None]] = []


class RangeHandler(http.server.BaseHTTPRequestHandler):
    server: ReleaseServer

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        total = len(body)
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= total:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{total}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        self.send_header("Content-Length", str(total - start))
        md5 = base64.b64encode(srv.md5.get(self.path) or hashlib.md5(body).digest()).decode()
        self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={md5}")
        self.end_headers()
        payload = body[start:]
        if self.path in srv.cut:
            payload = payload[: srv.cut.pop(self.path) - start]
            self.wfile.write(payload)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ReleaseServer]:
    srv = ReleaseServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SIMCLRV2_RELEASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/simclrv2")
    monkeypatch.setenv("SIMCLRV2_CACHE", str(tmp_path / "cache"))
    yield srv
    srv.shutdown()
    srv.server_close()


def publish(srv: ReleaseServer, folder: Path, category: str, model: str) -> dict[str, bytes]:
    """Put a TF checkpoint folder on the server at /simclrv2/<category>/<model>/."""
    files = {f.name: f.read_bytes() for f in folder.iterdir()}
    # the state file of a release records the training bucket's path
    files["checkpoint"] = files["checkpoint"].replace(b'"model.ckpt', b'"gs://train-bucket/run/model.ckpt')
    srv.files.update({f"/simclrv2/{category}/{model}/{name}": data for name, data in files.items()})
    return files


@pytest.fixture
def tiny_release(server: ReleaseServer, tmp_path: Path) -> dict[str, Any]:
    # served under a registered release name; only the content is the tiny ResNet-10
    tensors = tiny_tf_checkpoint(tmp_path / "src")
    files = publish(server, tmp_path / "src", "finetuned_10pct", "r50_1x_sk0")
    return {"tensors": tensors, "files": files, "server": server}


DATA = "model.ckpt-30.data-00000-of-00001"


@pytest.mark.slow
def test_download_resumes_an_interrupted_transfer(tiny_release: dict[str, Any], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    srv = tiny_release["server"]
    data_path = f"/simclrv2/finetuned_10pct/r50_1x_sk0/{DATA}"
    whole = tiny_release["files"][DATA]
    srv.cut[data_path] = len(whole) // 3
    with pytest.raises(released.DownloadError, match=r"interrupted after \d+ of \d+ bytes.*run again to resume"):
        released.fetch_release("r50_1x_sk0", "finetuned_10pct")
    part = tmp_path / "cache" / "finetuned_10pct" / "r50_1x_sk0" / (DATA + ".part")
    assert part.stat().st_size == len(whole) // 3
    folder = released.fetch_release("r50_1x_sk0", "finetuned_10pct")
    assert srv.log[-1] == (data_path, f"bytes={len(whole) // 3}-")  # resumed, not restarted
    assert (folder / DATA).read_bytes() == whole and not part.exists()
    assert "download " + DATA + ": 100%" in capsys.readouterr().err
    # cached: a second call asks the server for nothing
    n = len(srv.log)
    released.fetch_release("r50_1x_sk0", "finetuned_10pct")
    assert len(srv.log) == n


@pytest.mark.slow
def test_size_mismatch_and_checksum_mismatch_are_refused(tiny_release: dict[str, Any], tmp_path: Path) -> None:
    srv = tiny_release["server"]
    data_path = f"/simclrv2/finetuned_10pct/r50_1x_sk0/{DATA}"
    whole = tiny_release["files"][DATA]
    srv.files[data_path] = whole + b"\0" * 16  # not the object the index describes
    with pytest.raises(released.DownloadError, match=rf"has {len(whole) + 16} bytes but the checkpoint index needs "
                                                     rf"{len(whole)}"):
        released.fetch_release("r50_1x_sk0", "finetuned_10pct")
    folder = tmp_path / "cache" / "finetuned_10pct" / "r50_1x_sk0"
    assert not (folder / DATA).exists()
    # right size, wrong bytes (corrupted in transit): the server's MD5 of the object catches it
    corrupted = bytearray(whole)
    corrupted[5] ^= 1
    srv.files[data_path] = bytes(corrupted)
    srv.md5[data_path] = hashlib.md5(whole).digest()
    with pytest.raises(released.DownloadError, match="MD5 mismatch"):
        released.fetch_release("r50_1x_sk0", "finetuned_10pct")
    assert not (folder / DATA).exists() and not (folder / (DATA + ".part")).exists()
    srv.files[data_path] = whole
    del srv.md5[data_path]
    assert (released.fetch_release("r50_1x_sk0", "finetuned_10pct") / DATA).read_bytes() == whole


@pytest.mark.slow
def test_convert_and_load_pretrained_by_name(tiny_release: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["convert", "r50_1x_sk0", "category=finetuned_10pct"]) == 0
    out = tmp_path / "r50_1x_sk0_finetuned_10pct.safetensors"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["ft_proj_selector"] == 1 and meta["source"]["category"] == "finetuned_10pct"
    assert "ft_proj_selector=1 for a finetuned_10pct checkpoint" in capsys.readouterr().out
    n = len(tiny_release["server"].log)
    model = simclrv2.load_pretrained("r50_1x_sk0", category="finetuned_10pct")
    assert len(tiny_release["server"].log) == n  # the TF files came from the cache
    assert (tmp_path / "cache" / "finetuned_10pct" / "r50_1x_sk0.safetensors").is_file()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = model(x)
    ref = reference_outputs(tiny_release["tensors"], x, 10, 0.25, False, cifar_stem=True)
    torch.testing.assert_close(got["logits"].double(), ref["logits_1"], atol=2e-5, rtol=1e-5)
    assert got["logits"].shape == (2, NUM_CLASSES)
    with pytest.raises(released.DownloadError, match="unknown released category 'finetuned_10'; did you mean"):
        simclrv2.load_pretrained("r50_1x_sk0", category="finetuned_10")
    with pytest.raises(FileNotFoundError, match="neither a file nor a released model name"):
        simclrv2.load_pretrained("r50_1x_sk9")
    # a TF folder in the working directory named like a release is a path, not the release
    tiny_tf_checkpoint(tmp_path / "r50_1x_sk0")
    with pytest.raises(CheckpointError, match="is a TF checkpoint folder; convert it first"):
        simclrv2.load_pretrained("r50_1x_sk0")


def test_without_a_network_the_error_says_what_to_fetch_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SIMCLRV2_RELEASE_URL", f"http://127.0.0.1:{port}/simclrv2")
    monkeypatch.setenv("SIMCLRV2_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["convert", "r50_1x_sk1", "category=finetuned_1pct"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot reach http://127.0.0.1:{port}/simclrv2/finetuned_1pct/r50_1x_sk1/checkpoint" in err
    assert (f"gsutil -m cp -r gs://simclr-checkpoints/simclrv2/finetuned_1pct/r50_1x_sk1 "
            f"{tmp_path / 'cache' / 'finetuned_1pct'}/)") in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_files_put_in_the_cache_by_hand_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMCLRV2_RELEASE_URL", "http://127.0.0.1:9/unreachable")
    monkeypatch.setenv("SIMCLRV2_CACHE", str(tmp_path / "cache"))
    tiny_tf_checkpoint(tmp_path / "cache" / "pretrained" / "r50_1x_sk1")  # as `gsutil cp -r` leaves it
    monkeypatch.chdir(tmp_path)
    assert convert_main(["r50_1x_sk1", "--out", "m.safetensors"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["ft_proj_selector"] == 0


def test_release_urls_follow_the_official_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    # google-research/simclr README lists gs://simclr-checkpoints/simclrv2/<category>; Cloud Storage
    # serves public objects at https://storage.googleapis.com/<bucket>/<object>
    monkeypatch.delenv("SIMCLRV2_RELEASE_URL", raising=False)
    assert (released.release_url("finetuned_10pct", "r50_1x_sk1", "checkpoint")
            == "https://storage.googleapis.com/simclr-checkpoints/simclrv2/finetuned_10pct/r50_1x_sk1/checkpoint")
    monkeypatch.setenv("SIMCLRV2_CACHE", "/data/cache")
    assert released.cache_dir() == Path("/data/cache")
