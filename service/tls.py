"""TLS from PEM files for the REST and gRPC servers, reloaded without a restart; client side.

``KIPAM_TLS_CERT`` and ``KIPAM_TLS_KEY`` turn TLS (1.2 or newer) on for both listeners.
``KIPAM_TLS_CLIENT_CA`` makes the gRPC server require a client certificate signed by that CA
(mTLS, for controllers). REST never asks for a client certificate: its callers present
bearer tokens.

Theory of operation. :class:`ServerTls` reads the files once, checks them (the certificate
parses, the key is the certificate's, the CA parses) and serves them:

* REST: uvicorn keeps one :class:`ssl.SSLContext` (:attr:`ServerTls.ssl_context`) for its
  whole life. Its SNI callback, which OpenSSL calls on every handshake (with or without a
  server name), hands the new connection the context of the current certificate. A new
  certificate so replaces the old one whole; loading it into the same context would not
  when the key type changes (OpenSSL keeps one certificate per key type and could go on
  offering the old one).
* gRPC: the core calls the fetcher given to :func:`grpc.dynamic_ssl_server_credentials`
  before every handshake, from a thread of its own. It answers the new configuration once
  after a reload, else None ("unchanged"): a lock and a swap, nothing else.

:meth:`ServerTls.watch` compares the files' identity (inode, size, modification time) every
``KIPAM_TLS_RELOAD_S`` seconds, and :meth:`ServerTls.request_reload` (SIGHUP) makes it
read them at once. Files that do not check out (half-written, a key of another certificate)
are logged as a warning once per version of the files, and the previous certificate goes on
serving. Connections already open keep the certificate they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

import grpc

from service.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from service.config import Settings

__all__ = ["ServerTls", "client_credentials"]

_log = logging.getLogger("kipam.tls")

# (inode, size, modification time in ns) of each file, None where it cannot be read.
_Fingerprint: TypeAlias = tuple[tuple[int, int, int] | None, ...]
_CERT: Final = "KIPAM_TLS_CERT"
_KEY: Final = "KIPAM_TLS_KEY"
_CLIENT_CA: Final = "KIPAM_TLS_CLIENT_CA"


class _EncryptedKeyError(Exception):
    """The key asks for a password; kipam has none to give (and must never prompt)."""


@dataclass(frozen=True, slots=True)
class _Material:
    """One checked version of the files: their bytes, and the SSL context built from them."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext
    fingerprint: _Fingerprint


class ServerTls:
    """The server's certificate for REST and gRPC, reloaded from its files while serving.

    One instance serves one uvicorn server and one gRPC server (the fetcher hands a new
    certificate to one gRPC port).

    Args:
        cert: PEM certificate chain (the server's certificate first).
        key: PEM private key of ``cert``, unencrypted.
        client_ca: PEM CA bundle; when given, gRPC callers must present a certificate it
            signed.

    Raises:
        InvalidRequestError: a file cannot be read or does not check out; the message names
            its variable and path.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        material = self._read()
        self._current = material
        self._rejected: _Fingerprint | None = None  # files already warned about
        self._lock = threading.Lock()
        self._grpc_pending: grpc.ServerCertificateConfiguration | None = None
        self._wake = asyncio.Event()
        self.ssl_context = _server_context()
        _load_chain(self.ssl_context, material.cert, material.key)  # checked: cannot fail
        self.ssl_context.sni_callback = self._pick_context
        self.grpc_credentials: grpc.ServerCredentials = grpc.dynamic_ssl_server_credentials(
            _grpc_config(material),
            self._fetch_grpc_config,
            require_client_authentication=client_ca is not None,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerTls | None:
        """TLS as ``settings`` say, or None when it is off.

        Raises:
            InvalidRequestError: as the constructor.
        """
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)

    @property
    def mtls(self) -> bool:
        """Whether gRPC callers must present a client certificate."""
        return self.client_ca is not None

    def uvicorn_context(self, _config: object, _default: object) -> ssl.SSLContext:
        """``uvicorn.Config(ssl_context_factory=...)``: the one reloading context."""
        return self.ssl_context

    def reload(self, *, force: bool = False) -> bool:
        """Read the files again if they changed (or when forced) and serve them if they check out.

        Safe to call from any one thread at a time; never raises for bad files.

        Returns:
            Whether new handshakes now get a certificate read just now.
        """
        fingerprint = _fingerprint(self._paths())
        if not force and fingerprint == self._current.fingerprint:
            return False
        if not force and fingerprint == self._rejected:
            return False  # already said so for this version of the files
        try:
            material = self._read()
        except InvalidRequestError as exc:
            self._rejected = fingerprint
            _log.warning(
                "TLS files changed but are not usable, still serving the previous certificate: %s",
                exc.message,
            )
            return False
        self._rejected = None
        self._current = material  # the SNI callback reads it: one reference swap
        with self._lock:
            self._grpc_pending = _grpc_config(material)
        _log.info("TLS certificate reloaded from %s", self.cert)
        return True

    def request_reload(self) -> None:
        """Make :meth:`watch` read the files now, changed or not (the SIGHUP handler)."""
        self._wake.set()

    async def watch(self, interval_s: float) -> None:
        """Check the files every ``interval_s`` seconds, and on request, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._wake.wait()
            force = self._wake.is_set()
            self._wake.clear()
            try:
                await asyncio.to_thread(self.reload, force=force)
            except Exception:  # noqa: BLE001 - a bug here must not stop the server or the watch
                _log.exception("TLS reload failed; still serving the previous certificate")

    def _paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key, *((self.client_ca,) if self.client_ca else ()))

    def _read(self) -> _Material:
        """Read and check the files; each is read once, so REST and gRPC serve the same bytes."""
        cert, cert_id = _read(self.cert, _CERT)
        key, key_id = _read(self.key, _KEY)
        client_ca, ca_id = _read(self.client_ca, _CLIENT_CA) if self.client_ca else (None, None)
        _check_certificates(cert, self.cert, _CERT)
        if client_ca is not None:
            _check_certificates(client_ca, self.client_ca, _CLIENT_CA)
        context = _server_context()
        try:
            _load_chain(context, cert, key)
        except _EncryptedKeyError:
            raise InvalidRequestError(
                f"{_KEY} file {self.key} is encrypted; kipam needs the key without a password.",
                field=_KEY,
            ) from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
                raise InvalidRequestError(
                    f"{_KEY} file {self.key} is not the key of the certificate in {_CERT} "
                    f"file {self.cert}.",
                    field=_KEY,
                ) from None
            raise InvalidRequestError(
                f"{_KEY} file {self.key} holds no usable PEM private key ({exc.reason}).",
                field=_KEY,
            ) from None
        ids = (cert_id, key_id, *((ca_id,) if self.client_ca else ()))
        return _Material(cert, key, client_ca, context, ids)

    def _pick_context(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        """SNI callback: every new connection gets the current certificate's context."""
        connection.context = self._current.context

    def _fetch_grpc_config(self) -> grpc.ServerCertificateConfiguration | None:
        """GRPC core, before each handshake (its own thread): the new configuration, once."""
        with self._lock:
            config, self._grpc_pending = self._grpc_pending, None
        return config


def client_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for :class:`service.client.KipamClient`.

    Args:
        ca: PEM CA bundle the server's certificate must chain to; None: the system's roots.
        cert: PEM client certificate chain, for a server that requires one (mTLS).
        key: PEM private key of ``cert``.

    Raises:
        InvalidRequestError: ``cert`` without ``key`` or the other way round, or a file that
            cannot be read.
    """
    if (cert is None) != (key is None):
        raise InvalidRequestError(
            "A client certificate needs its key, and the key its certificate "
            "(--client-cert and --client-key, KIPAM_CLIENT_CERT and KIPAM_CLIENT_KEY).",
            field="--client-cert",
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--ca-cert")[0] if ca else None,
        private_key=_read(key, "--client-key")[0] if key else None,
        certificate_chain=_read(cert, "--client-cert")[0] if cert else None,
    )


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def _grpc_config(material: _Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


def _no_password() -> str:
    raise _EncryptedKeyError


def _read(path: Path, name: str) -> tuple[bytes, tuple[int, int, int]]:
    """A file's bytes and identity (inode, size, mtime of what was read).

    Raises:
        InvalidRequestError: it cannot be read; the message names ``name`` and the path.
    """
    try:
        with path.open("rb") as file:
            st = os.fstat(file.fileno())
            data = file.read()
    except OSError as exc:
        raise InvalidRequestError(
            f"Cannot read {name} file {path}: {exc.strerror or exc}.", field=name
        ) from None
    return data, (st.st_ino, st.st_size, st.st_mtime_ns)


def _fingerprint(paths: tuple[Path, ...]) -> _Fingerprint:
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _check_certificates(data: bytes, path: Path | None, name: str) -> None:
    """Raise InvalidRequestError unless ``data`` is PEM holding at least one certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError):  # UnicodeDecodeError is a ValueError
        raise InvalidRequestError(
            f"{name} file {path} holds no valid PEM certificate.", field=name
        ) from None


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """``load_cert_chain`` from bytes (OpenSSL loads a key only from a file).

    On Linux the files are anonymous in-memory files (memfd), so the key never lands on a
    disk; elsewhere a private temporary directory, removed at once.
    """
    with _as_files(cert, key) as (cert_file, key_file):
        context.load_cert_chain(cert_file, key_file, password=_no_password)


@contextlib.contextmanager
def _as_files(*blobs: bytes) -> Iterator[list[str]]:
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and Path("/proc/self/fd").is_dir():
        fds: list[int] = []
        try:
            for blob in blobs:
                fds.append(memfd_create("kipam-tls", os.MFD_CLOEXEC))
                os.write(fds[-1], blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="kipam-tls-") as folder:
        paths = []
        for index, blob in enumerate(blobs):
            path = Path(folder, str(index))
            path.touch(mode=0o600)
            path.write_bytes(blob)
            paths.append(str(path))
        yield paths
