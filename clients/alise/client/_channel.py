"""Channel construction shared by the SDK and the services' internal clients."""

from __future__ import annotations

import grpc

_OPTIONS = [("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20)]


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel_credentials(tls_ca: str | None, tls_cert: str | None = None,
                        tls_key: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: ``tls_ca`` verifies the server; cert + key present a client certificate."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca),
                                        private_key=_read(tls_key),
                                        certificate_chain=_read(tls_cert))


def make_aio_channel(address: str, *, tls: bool = False, tls_ca: str | None = None,
                     tls_cert: str | None = None, tls_key: str | None = None) -> grpc.aio.Channel:
    if tls or tls_ca or tls_cert:
        return grpc.aio.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key),
                                       options=_OPTIONS)
    return grpc.aio.insecure_channel(address, options=_OPTIONS)


def make_channel(address: str, *, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> grpc.Channel:
    if tls or tls_ca or tls_cert:
        return grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key),
                                   options=_OPTIONS)
    return grpc.insecure_channel(address, options=_OPTIONS)
