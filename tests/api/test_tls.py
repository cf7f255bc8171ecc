"""TLS for REST and gRPC, mTLS for gRPC, and certificate reload, with certificates made here.

Every certificate comes from :class:`Authority` (the ``cryptography`` package) in the test's
own folder; servers listen on loopback only, on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.app import HttpServer, use_cases
from service.client import KipamClient
from service.errors import InvalidRequestError, Kind, ServerUnavailableError, kind_of
from service.grpc.server import GrpcServer
from service.rest.app import build_http_app
from service.tls import ServerTls, client_credentials
from tests.api.conftest import until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    import grpc

    from service.config import Settings
    from service.store import Database

pytestmark = [pytest.mark.integration, pytest.mark.api]

KIPAM = [sys.executable, "-m", "service.cli"]
_DAY = dt.timedelta(days=1)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _pem_key(key: PrivateKey, password: bytes | None = None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Authority:
    """A certificate authority that issues server and client certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def new(cls, name: str) -> Authority:
        """A self-signed CA called ``name``."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, server: bool, rsa_key: bool = False) -> tuple[bytes, bytes]:
        """A leaf certificate and its key (PEM); a server's names localhost, 127.0.0.1, ::1."""
        key: PrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if rsa_key
            else ec.generate_private_key(ec.SECP256R1())
        )
        names: list[x509.GeneralName] = [x509.DNSName("localhost" if server else name)]
        if server:
            names += [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@dataclass(frozen=True)
class Pki:
    """A CA, the server's certificate and a client's, as files in one folder."""

    folder: Path
    ca: Authority

    @property
    def ca_file(self) -> Path:
        """The CA certificate (trusted by clients, and by the server for mTLS)."""
        return self.folder / "ca.pem"

    @property
    def cert(self) -> Path:
        """The server's certificate (KIPAM_TLS_CERT)."""
        return self.folder / "server.pem"

    @property
    def key(self) -> Path:
        """The server's key (KIPAM_TLS_KEY)."""
        return self.folder / "server.key"

    @property
    def client_cert(self) -> Path:
        """A client certificate the CA signed."""
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        """Its key."""
        return self.folder / "client.key"

    def write(self, name: str, data: bytes) -> Path:
        """Replace a file atomically (as a Kubernetes secret volume does), in this folder."""
        path = self.folder / name
        scratch = self.folder / f".{name}.new"
        scratch.write_bytes(data)
        scratch.replace(path)
        return path

    def rotate(self, authority: Authority, name: str, *, rsa_key: bool = False) -> None:
        """A new server certificate from ``authority``: the certificate first, then the key."""
        cert, key = authority.issue(name, server=True, rsa_key=rsa_key)
        self.write("server.pem", cert)
        self.write("server.key", key)


@pytest.fixture(name="pki")
def _pki(tmp_path: Path) -> Pki:
    """A CA with a server certificate ("kipam-1") and a client certificate ("controller")."""
    pki = Pki(tmp_path, Authority.new("kipam test CA"))
    pki.write("ca.pem", pki.ca.pem)
    pki.rotate(pki.ca, "kipam-1")
    cert, key = pki.ca.issue("controller", server=False)
    pki.write("client.pem", cert)
    pki.write("client.key", key)
    return pki


@dataclass(frozen=True)
class Endpoints:
    """Where a TLS replica listens."""

    grpc: str
    https: str
    http_port: int
    grpc_port: int


@contextlib.asynccontextmanager
async def tls_serving(
    db: Database, settings: Settings, tls: ServerTls, *, host: str = "127.0.0.1"
) -> AsyncIterator[Endpoints]:
    """REST and gRPC of one replica over ``tls`` on free ports, its files watched every 0.1 s."""
    async with use_cases(settings, db) as res:
        bracketed = f"[{host}]" if ":" in host else host
        grpc_server = GrpcServer(res, f"{bracketed}:0")
        await grpc_server.start(tls)
        config = uvicorn.Config(
            build_http_app(res),
            host=host,
            port=0,
            log_level="warning",
            lifespan="off",
            access_log=False,
            ssl_context_factory=tls.uvicorn_context,
        )
        http = HttpServer(config)
        task = asyncio.create_task(http.serve())
        watch = asyncio.create_task(tls.watch(0.1))
        try:
            await until(lambda: http.started or task.done())
            if task.done():
                await task  # raises what stopped it
            port = http.servers[0].sockets[0].getsockname()[1]
            yield Endpoints(
                f"{bracketed}:{grpc_server.port}",
                f"https://{bracketed}:{port}",
                port,
                grpc_server.port,
            )
        finally:
            watch.cancel()
            http.should_exit = True
            await task
            await grpc_server.stop(1.0)


def _client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def peer_name(port: int, pki: Pki | None = None, host: str = "127.0.0.1") -> str:
    """The common name of the certificate a new TLS handshake on ``port`` presents.

    Trusts anything (it only looks); ``pki`` lends its client certificate, for mTLS ports.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    if pki is not None:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    _ = reader
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def grpc_works(target: str, credentials: grpc.ChannelCredentials) -> bool:
    """Whether a new channel with ``credentials`` gets an answer (False: refused)."""
    async with KipamClient(target, timeout=5.0, credentials=credentials) as client:
        try:
            await client.list_pools()
        except ServerUnavailableError:
            return False
    return True


def _with_tls(settings: Settings, pki: Pki, *, mtls: bool = False) -> Settings:
    return dataclasses.replace(
        settings,
        tls_cert=pki.cert,
        tls_key=pki.key,
        tls_client_ca=pki.ca_file if mtls else None,
        tls_reload_s=0.1,
    )


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_rest_and_grpc_over_tls(
    db: Database, settings: Settings, pki: Pki, clean: None, host: str
) -> None:
    """Over TLS, clients that trust the CA get answers; plaintext and other CAs get nothing."""
    _ = clean
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    tls = ServerTls(pki.cert, pki.key)
    async with tls_serving(db, _with_tls(settings, pki), tls, host=host) as at:
        async with httpx.AsyncClient(
            base_url=at.https, verify=_client_context(pki.ca_file), timeout=10
        ) as https:
            assert (await https.get("/healthz")).json() == {"status": "ok"}
            assert (await https.get("/v1/pools")).status_code == 200
        plain = at.https.replace("https://", "http://")
        async with httpx.AsyncClient(base_url=plain, timeout=5) as http:
            with pytest.raises(httpx.TransportError):
                await http.get("/healthz")
        async with KipamClient(at.grpc, credentials=client_credentials(pki.ca_file)) as client:
            await client.create_pool("tls", cidr="fd00:7::/48")
            assert (await client.get_pool("tls")).name == "tls"
        async with KipamClient(at.grpc, timeout=5.0) as plaintext:
            with pytest.raises(ServerUnavailableError):
                await plaintext.get_pool("tls")
        other = pki.write("other-ca.pem", Authority.new("another CA").pem)
        assert not await grpc_works(at.grpc, client_credentials(other))


async def test_mtls_refuses_grpc_callers_without_a_trusted_certificate(
    db: Database, settings: Settings, pki: Pki, clean: None
) -> None:
    """With mTLS the CA's client certificate gets answers; none, or another CA's, is refused."""
    _ = clean
    tls = ServerTls(pki.cert, pki.key, pki.ca_file)
    assert tls.mtls
    async with tls_serving(db, _with_tls(settings, pki, mtls=True), tls) as at:
        trusted = client_credentials(pki.ca_file, pki.client_cert, pki.client_key)
        assert await grpc_works(at.grpc, trusted)
        async with KipamClient(
            at.grpc, timeout=5.0, credentials=client_credentials(pki.ca_file)
        ) as anonymous:
            with pytest.raises(ServerUnavailableError) as refused:
                await anonymous.list_pools()
        assert kind_of(refused.value) is Kind.UNAVAILABLE
        stranger = Authority.new("stranger CA")
        cert, key = stranger.issue("intruder", server=False)
        forged = client_credentials(
            pki.ca_file, pki.write("intruder.pem", cert), pki.write("intruder.key", key)
        )
        assert not await grpc_works(at.grpc, forged)
        # REST asks for no client certificate: its callers present tokens.
        async with httpx.AsyncClient(verify=_client_context(pki.ca_file), timeout=10) as https:
            assert (await https.get(f"{at.https}/healthz")).status_code == 200


async def test_a_new_certificate_is_served_without_a_restart(
    db: Database, settings: Settings, pki: Pki, clean: None
) -> None:
    """New files (new CA, new key type) reach new handshakes; open channels keep working."""
    _ = clean
    tls = ServerTls(pki.cert, pki.key)
    async with tls_serving(db, _with_tls(settings, pki), tls) as at:
        assert await peer_name(at.http_port) == "kipam-1"
        assert await peer_name(at.grpc_port) == "kipam-1"
        async with KipamClient(at.grpc, credentials=client_credentials(pki.ca_file)) as before:
            await before.list_pools()  # connected with the first certificate
            second = Authority.new("second CA")
            second_ca = pki.write("second-ca.pem", second.pem)
            pki.rotate(second, "kipam-2", rsa_key=True)  # EC to RSA: the old one must go

            async def rest_rotated() -> bool:
                return await peer_name(at.http_port) == "kipam-2"

            async def grpc_rotated() -> bool:
                return await peer_name(at.grpc_port) == "kipam-2"

            await until(rest_rotated)
            await until(grpc_rotated)
            assert await grpc_works(at.grpc, client_credentials(second_ca))
            assert not await grpc_works(at.grpc, client_credentials(pki.ca_file))
            async with httpx.AsyncClient(verify=_client_context(second_ca), timeout=10) as https:
                assert (await https.get(f"{at.https}/healthz")).status_code == 200
            await before.list_pools()  # the open connection keeps its certificate


async def test_a_broken_replacement_keeps_the_old_certificate(
    db: Database, settings: Settings, pki: Pki, clean: None
) -> None:
    """A garbage or mismatched key is refused: the old pair serves until a matching one."""
    _ = clean
    tls = ServerTls(pki.cert, pki.key, pki.ca_file)
    async with tls_serving(db, _with_tls(settings, pki, mtls=True), tls) as at:
        trusted = client_credentials(pki.ca_file, pki.client_cert, pki.client_key)
        pki.write(
            "server.key", b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"
        )
        await until(lambda: tls._rejected is not None)
        assert await peer_name(at.http_port) == "kipam-1"
        assert await peer_name(at.grpc_port, pki) == "kipam-1"
        assert await grpc_works(at.grpc, trusted)

        # Half a rotation: the new certificate beside a key that is not its own.
        rejected = tls._rejected
        cert, key = pki.ca.issue("kipam-3", server=True)
        pki.write("server.pem", cert)
        await until(lambda: tls._rejected not in {None, rejected})
        assert await peer_name(at.http_port) == "kipam-1"
        assert await peer_name(at.grpc_port, pki) == "kipam-1"
        assert not tls.reload()  # the same bad files: nothing new, no second warning

        pki.write("server.key", key)  # the rotation completes

        async def rotated() -> bool:
            names = (await peer_name(at.http_port), await peer_name(at.grpc_port, pki))
            return names == ("kipam-3", "kipam-3")

        await until(rotated)
        assert await grpc_works(at.grpc, trusted)


def _garbage(path: Path) -> None:
    path.write_text("not a PEM file\n")


def _other_key(pki: Pki) -> None:
    pki.key.write_bytes(pki.ca.issue("someone-else", server=True)[1])


def _encrypted_key(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pki.key.write_bytes(_pem_key(key, b"secret"))


@pytest.mark.parametrize(
    ("spoil", "variable", "says"),
    [
        (lambda p: p.cert.unlink(), "KIPAM_TLS_CERT", "Cannot read"),
        (lambda p: _garbage(p.cert), "KIPAM_TLS_CERT", "no valid PEM certificate"),
        (lambda p: _garbage(p.key), "KIPAM_TLS_KEY", "no usable PEM private key"),
        (_other_key, "KIPAM_TLS_KEY", "is not the key of the certificate"),
        (_encrypted_key, "KIPAM_TLS_KEY", "encrypted"),
        (lambda p: _garbage(p.ca_file), "KIPAM_TLS_CLIENT_CA", "no valid PEM certificate"),
    ],
    ids=["missing-cert", "garbage-cert", "garbage-key", "other-key", "encrypted-key", "bad-ca"],
)
def test_unusable_files_at_start_are_one_clear_error(
    pki: Pki, spoil: Callable[[Pki], None], variable: str, says: str
) -> None:
    """Each unusable file is refused at start with its variable, its path and the reason."""
    spoil(pki)
    with pytest.raises(InvalidRequestError) as refused:
        ServerTls(pki.cert, pki.key, pki.ca_file)
    assert variable in refused.value.message
    assert says in refused.value.message
    assert refused.value.field == variable


def test_client_credentials_want_a_certificate_and_its_key(pki: Pki) -> None:
    """A client certificate without its key (or the reverse), or a missing file, is refused."""
    with pytest.raises(InvalidRequestError, match="needs its key"):
        client_credentials(pki.ca_file, pki.client_cert, None)
    with pytest.raises(InvalidRequestError, match="--ca-cert"):
        client_credentials(pki.folder / "absent.pem")


async def test_the_token_goes_with_every_call() -> None:
    """A token becomes the authorization metadata of each call."""
    async with KipamClient(
        "127.0.0.1:1",
        token="kipam_abc_s3cret",  # noqa: S106 - a made-up token
        metadata=[("x-request-id", "r")],
    ) as client:
        assert client.metadata == (
            ("x-request-id", "r"),
            ("authorization", "Bearer kipam_abc_s3cret"),
        )


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *KIPAM,
        *args,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")}, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_speaks_tls_and_mtls(
    db: Database, settings: Settings, pki: Pki, clean: None
) -> None:
    """The CLI gets through mTLS with its flags; refused, it says so in one line, no token."""
    _ = clean
    tls = ServerTls(pki.cert, pki.key, pki.ca_file)
    token = "kipam_k3y1d_n0t-to-be-printed"  # noqa: S105 - a made-up token
    async with tls_serving(db, _with_tls(settings, pki, mtls=True), tls) as at:
        ok = await _cli(
            "pool", "list", "--server", at.grpc, "--output", "json",
            "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key),
            "--token", token,
            env={"KIPAM_CA_CERT": str(pki.ca_file)},
        )  # fmt: skip
        assert ok[0] == 0, ok[2]
        refused = await _cli(
            "pool", "list", "--server", at.grpc, "--ca-cert", str(pki.ca_file),
            "--timeout", "5", env={"KIPAM_TOKEN": token},
        )  # fmt: skip
        assert refused[0] == 1
        assert refused[2].count("\n") == 1, refused[2]
        assert "Traceback" not in refused[2]
        half = await _cli(
            "pool", "list", "--server", at.grpc, "--client-cert", str(pki.client_cert)
        )
        assert half[0] == 1
        assert "needs its key" in half[2]
        for _, out, err in (ok, refused, half):
            assert token not in out + err


@pytest.mark.slow
async def test_kipam_serve_with_tls_reloads_on_sighup(
    dsn: str, pki: Pki, free_port: Callable[[], int]
) -> None:
    """`kipam serve` with TLS and mTLS: it says so, serves, reloads on SIGHUP, stops cleanly."""
    http_port, grpc_port = free_port(), free_port()
    log = pki.folder / "serve.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")},
        "KIPAM_DATABASE_URL": dsn,  # the session's database: this test only reads
        "KIPAM_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "KIPAM_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "KIPAM_TLS_CERT": str(pki.cert),
        "KIPAM_TLS_KEY": str(pki.key),
        "KIPAM_TLS_CLIENT_CA": str(pki.ca_file),
        "KIPAM_TLS_RELOAD_S": "3600",  # only SIGHUP reloads within this test
        "KIPAM_LOG_FORMAT": "console",
    }
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(*KIPAM, "serve", env=env, stderr=stderr)
    try:
        async with httpx.AsyncClient(verify=_client_context(pki.ca_file), timeout=2) as https:

            async def ready() -> bool:
                assert proc.returncode is None, log.read_text()
                with contextlib.suppress(httpx.TransportError):
                    return (await https.get(f"https://127.0.0.1:{http_port}/readyz")).is_success
                return False

            await until(ready, within=60)
        assert "mTLS on for gRPC" in log.read_text()
        target = f"127.0.0.1:{grpc_port}"
        trusted = client_credentials(pki.ca_file, pki.client_cert, pki.client_key)
        assert await grpc_works(target, trusted)
        assert not await grpc_works(target, client_credentials(pki.ca_file))

        pki.rotate(pki.ca, "kipam-2")
        assert await peer_name(http_port) == "kipam-1"  # no reload before the signal
        proc.send_signal(signal.SIGHUP)

        async def rotated() -> bool:
            names = (await peer_name(http_port), await peer_name(grpc_port, pki))
            return names == ("kipam-2", "kipam-2")

        await until(rotated)
        assert await grpc_works(target, trusted)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_serve_refuses_unusable_tls_files(pki: Pki, free_port: Callable[[], int]) -> None:
    """`kipam serve` with a key that is not the certificate's: exit 1, one line, no traceback."""
    import subprocess  # noqa: PLC0415 - only this test waits for a process synchronously

    _other_key(pki)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")},
        "KIPAM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",  # never reached
        "KIPAM_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "KIPAM_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "KIPAM_TLS_CERT": str(pki.cert),
        "KIPAM_TLS_KEY": str(pki.key),
    }
    result = subprocess.run(
        [*KIPAM, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "KIPAM_TLS_KEY" in result.stderr
    assert str(pki.key) in result.stderr
    assert "Traceback" not in result.stderr
