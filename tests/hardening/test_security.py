"""TLS (server certificate, optional client certificates) and bearer tokens, with certificates made
at test time; the client and CLI pick both up from GRADCHECK_* variables."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import trustme
from service_servers import Running, start_server

from gradcheck_svc import cli
from gradcheck_svc.client import CheckCall, Client
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.server import auth
from gradcheck_svc.settings import Settings

X = torch.tensor(3.0, dtype=torch.float64)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 / localhost, a client certificate, and a stranger CA."""
    root = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("ci-job@example.org")
    files = {
        "ca": ca.cert_pem,
        "stranger_ca": stranger.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = root / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def tls_server(pki: dict[str, Path]) -> Iterator[Running]:
    running = start_server(
        replica_name="tls",
        tls_cert_file=str(pki["server_cert"]),
        tls_key_file=str(pki["server_key"]),
        auth_tokens="s3cret",
        isolation="thread",
    )
    yield running
    running.server.stop(grace=0)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("GRADCHECK_TOKEN", "GRADCHECK_TLS_CA", "GRADCHECK_TLS_CERT", "GRADCHECK_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def code_of(call: object) -> str | None:
    with pytest.raises(ServiceError) as info:
        call()  # type: ignore[operator]
    return info.value.code


def test_tls_with_token(tls_server: Running, pki: dict[str, Path], clean_env: pytest.MonkeyPatch) -> None:
    with Client(tls_server.address, tls_ca=pki["ca"], token="s3cret", timeout=30) as c:
        report = c.check("x**2", x=X)
        assert report.ok and report.served_by == "tls"
        assert c.capabilities().served_by == "tls"
        [streamed] = list(c.check_stream([CheckCall("x**3", points=[{"x": X}])]))
        assert streamed.reports and streamed.reports[0].ok


def test_tls_refuses_plaintext_and_strangers(
    tls_server: Running, pki: dict[str, Path], clean_env: pytest.MonkeyPatch
) -> None:
    with Client(tls_server.address, token="s3cret", connect_timeout=2) as plain:
        assert code_of(lambda: plain.check("x**2", x=X)) == "UNAVAILABLE"
    with Client(tls_server.address, tls_ca=pki["stranger_ca"], token="s3cret", connect_timeout=2) as c:
        assert code_of(lambda: c.check("x**2", x=X)) == "UNAVAILABLE"  # the certificate is not trusted


def test_tokens_are_required_except_for_health(
    tls_server: Running, pki: dict[str, Path], clean_env: pytest.MonkeyPatch
) -> None:
    for token in (None, "", "wrong", "s3cret2", "S3CRET"):
        with Client(tls_server.address, tls_ca=pki["ca"], token=token) as c:
            assert code_of(lambda c=c: c.check("x**2", x=X)) == "UNAUTHENTICATED"
            assert code_of(c.capabilities) == "UNAUTHENTICATED"
            with pytest.raises(ServiceError) as info:
                list(c.check_stream([CheckCall("x**2", points=[{"x": X}])]))
            assert info.value.code == "UNAUTHENTICATED"
            assert c.health() == "SERVING"  # probes need no token


def test_client_and_cli_read_token_and_ca_from_the_environment(
    tls_server: Running,
    pki: dict[str, Path],
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clean_env.setenv("GRADCHECK_TOKEN", "s3cret")
    clean_env.setenv("GRADCHECK_TLS_CA", str(pki["ca"]))
    with Client(tls_server.address) as c:
        assert c.check("x**2", x=X).ok
    assert cli.main(["check", "--target", tls_server.address, "--expr", "x**2", "--at", "x=3"]) == 0
    assert cli.main(["health", "--target", tls_server.address]) == 0
    assert "SERVING" in capsys.readouterr().out
    clean_env.setenv("GRADCHECK_TOKEN", "wrong")
    assert cli.main(["check", "--target", tls_server.address, "--expr", "x**2", "--at", "x=3"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_mutual_tls(pki: dict[str, Path], clean_env: pytest.MonkeyPatch) -> None:
    running = start_server(
        tls_cert_file=str(pki["server_cert"]),
        tls_key_file=str(pki["server_key"]),
        tls_client_ca_file=str(pki["ca"]),
        isolation="thread",
    )
    try:
        with Client(running.address, tls_ca=pki["ca"], connect_timeout=2) as anonymous:
            assert code_of(lambda: anonymous.check("x**2", x=X)) == "UNAVAILABLE"
        clean_env.setenv("GRADCHECK_TLS_CA", str(pki["ca"]))
        clean_env.setenv("GRADCHECK_TLS_CERT", str(pki["client_cert"]))
        clean_env.setenv("GRADCHECK_TLS_KEY", str(pki["client_key"]))
        with Client(running.address) as c:
            assert c.check("x**2", x=X).ok
    finally:
        running.server.stop(grace=0)


def test_settings_from_the_environment(pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().host == "127.0.0.1"  # loopback unless told otherwise
    assert not Settings().tls and not Settings().auth_tokens
    monkeypatch.setenv("GRADCHECK_TLS_CERT_FILE", str(pki["server_cert"]))
    monkeypatch.setenv("GRADCHECK_TLS_KEY_FILE", str(pki["server_key"]))
    monkeypatch.setenv("GRADCHECK_AUTH_TOKENS", "a,b")
    settings = Settings()
    assert settings.tls and [t.get_secret_value() for t in settings.auth_tokens] == ["a", "b"]
    assert "a" not in repr(settings.auth_tokens)  # tokens never reach logs
    monkeypatch.delenv("GRADCHECK_TLS_KEY_FILE")
    with pytest.raises(ValueError, match="go together"):
        Settings()


def test_tokens_are_compared_in_constant_time() -> None:
    source = inspect.getsource(auth.TokenAuthInterceptor._authorized)
    assert "hmac.compare_digest(digest, t) for t in self._tokens" in source and "given ==" not in source
    interceptor = auth.TokenAuthInterceptor(["abc", "a much longer token"])
    # Digests of one length: the comparison's time does not depend on the tokens' lengths.
    assert {len(t) for t in interceptor._tokens} == {32}
    assert interceptor._authorized([("authorization", "Bearer a much longer token")])
    assert interceptor._authorized([("authorization", "bearer abc")])
    for bad in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ab")], [("x", "abc")]):
        assert not interceptor._authorized(bad)


def test_reflection_needs_a_token_too(tls_server: Running, pki: dict[str, Path]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        answers = list(
            stub.ServerReflectionInfo(
                iter([request]), timeout=5, metadata=(("authorization", "Bearer s3cret"),)
            )
        )
        assert answers[0].list_services_response.service
