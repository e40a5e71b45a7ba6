"""`token=`, `tls=` and the server's pushback, against local gRPC servers made here (the rest of
the suite runs against a real cluster over TLS with a token from the environment): the token is
sent as `authorization: Bearer`, TLS verifies a self-signed certificate made here and refuses a
server it cannot verify, and a call refused with `grpc-retry-pushback-ms` is retried after that
wait."""

from __future__ import annotations

import datetime
import ipaddress
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import maos
from maos.v1 import tasks_pb2, tasks_pb2_grpc


class Recorder(tasks_pb2_grpc.TaskServiceServicer):  # type: ignore[misc]
    """Answers `Get`; the first `refusals` calls are pushed back as a busy node does."""

    def __init__(self, refusals: int = 0, pushback_ms: int = 0) -> None:
        self.metadata: list[dict[str, str]] = []
        self.refusals = refusals
        self.pushback_ms = pushback_ms
        self.calls: list[float] = []

    def Get(self, request: tasks_pb2.GetTaskRequest, context: Any) -> tasks_pb2.TaskView:
        self.calls.append(time.monotonic())
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        if len(self.calls) <= self.refusals:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms)),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy: retry shortly")
        return tasks_pb2.TaskView(task_id=request.task_id, state=tasks_pb2.TASK_STATE_COMPLETED, result="ok")


def self_signed(directory: Path) -> tuple[bytes, bytes, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "maos-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("maos.test"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path = directory / "ca.pem"
    path.write_bytes(cert_pem)
    return key_pem, cert_pem, path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path, Recorder]]:
    key_pem, cert_pem, ca = self_signed(tmp_path)
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(recorder, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()
    yield f"127.0.0.1:{port}", ca, recorder
    server.stop(grace=None)


def test_the_token_is_sent_as_a_bearer_header_over_tls(tls_server: tuple[str, Path, Recorder]) -> None:
    address, ca, recorder = tls_server
    tls = maos.TlsOptions(ca_file=str(ca), server_name="maos.test")
    with maos.Client([address], token="s3cret-token", tls=tls, deadline=5) as client:
        view = client.get("t-1")
    assert (view.task_id, view.state, view.result) == ("t-1", maos.TaskState.COMPLETED, "ok")
    assert recorder.metadata[-1].get("authorization") == "Bearer s3cret-token"


def test_no_token_sends_no_authorization(tls_server: tuple[str, Path, Recorder],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAOS_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent")
    address, ca, recorder = tls_server
    with maos.Client([address], tls=maos.TlsOptions(ca_file=str(ca)), deadline=5) as client:
        client.get("t-2")  # the certificate names 127.0.0.1 too
    assert "authorization" not in recorder.metadata[-1]


def test_tls_refuses_a_server_it_cannot_verify(tls_server: tuple[str, Path, Recorder], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAOS_CA_FILE", raising=False)
    address, _, recorder = tls_server
    other = tmp_path / "other"
    other.mkdir()
    _, _, wrong_ca = self_signed(other)
    with maos.Client([address], tls=maos.TlsOptions(ca_file=str(wrong_ca)), deadline=2) as client:
        with pytest.raises(maos.Unavailable):
            client.get("t-3")
    with maos.Client([address], deadline=2) as plaintext:
        with pytest.raises(maos.Unavailable):
            plaintext.get("t-4")
    assert recorder.metadata == []


def test_bad_tls_options_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(maos.InvalidArgument) as missing:
        maos.Client(["127.0.0.1:1"], tls=maos.TlsOptions(ca_file=str(tmp_path / "absent.pem")))
    assert missing.value.field == "tls.ca_file"
    with pytest.raises(maos.InvalidArgument) as half:
        maos.Client(["127.0.0.1:1"], tls=maos.TlsOptions(cert_file="c.pem"))
    assert half.value.field == "tls"
    with pytest.raises(maos.InvalidArgument):
        maos.Client(["127.0.0.1:1"], token="bad\ntoken")


@pytest.fixture
def busy_server() -> Iterator[tuple[str, Recorder]]:
    """A plaintext server whose first two calls are refused with a 300 ms pushback."""
    recorder = Recorder(refusals=2, pushback_ms=300)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", recorder
    server.stop(grace=None)


def test_a_pushed_back_call_is_retried_after_the_wait_it_was_given(
        busy_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAOS_CA_FILE", raising=False)
    address, recorder = busy_server
    with maos.Client([address], deadline=5) as client:
        assert client.get("t-5").result == "ok"
    assert len(recorder.calls) == 3
    gaps = [b - a for a, b in zip(recorder.calls, recorder.calls[1:])]
    assert all(gap >= 0.29 for gap in gaps), gaps


def test_a_pushback_longer_than_the_deadline_is_not_waited_out(
        busy_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAOS_CA_FILE", raising=False)
    address, recorder = busy_server
    recorder.pushback_ms = 60_000
    started = time.monotonic()
    with maos.Client([address], deadline=2) as client:
        with pytest.raises(maos.ResourceExhausted) as refused:
            client.get("t-6")
    assert refused.value.pushback_s == 60.0
    assert time.monotonic() - started < 1.5 and len(recorder.calls) == 1


async def _get_async(address: str) -> str:
    async with maos.AsyncClient([address], deadline=5) as client:
        return (await client.get("t-7")).result


def test_the_async_client_waits_out_a_pushback_too(busy_server: tuple[str, Recorder],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.delenv("MAOS_CA_FILE", raising=False)
    address, recorder = busy_server
    assert asyncio.run(_get_async(address)) == "ok"
    assert len(recorder.calls) == 3
