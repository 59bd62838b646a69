"""What to tell an operator whose requests to etcd fail for a reason on their side: the
advice both transports add to their errors, from the low-level failure they saw."""

from __future__ import annotations

import http.client
import ssl

PLAIN_HTTP_TO_TLS = (
    "Every connection was closed without a reply, which is what an etcd that serves TLS does "
    "with plain HTTP: if it serves https, use protocol=https (--rdzv-conf protocol=https "
    "with cacert=PATH; `etcd-rdzv status --protocol https --cacert PATH`)."
)
UNREACHABLE = "Check that etcd is running and reachable from this host."


def closed_without_reply(cause: BaseException | None) -> bool:
    """The server took the connection and closed it before any answer."""
    return isinstance(cause, http.client.BadStatusLine | ConnectionResetError)


def tls_failure(where: str, cause: BaseException, client_certificate: bool) -> str:
    """A failed TLS handshake, said with what to check: when no client certificate was given
    and the server broke the handshake off (an EOF, an alert), it likely demands one."""
    text = f"{where}: TLS handshake failed ({cause})."
    if not client_certificate and _ended_by_server(cause):
        return (
            f"{text} The server ended it: it may require a client certificate, signed by the "
            "CA it trusts (cert=PATH and key=PATH; `etcd-rdzv status --cert PATH --key PATH`)."
        )
    return f"{text} Check cacert, cert and key."


def _ended_by_server(cause: BaseException) -> bool:
    if isinstance(cause, ssl.SSLEOFError):
        return True
    text = str(cause)
    return "EOF occurred" in text or "alert" in text.lower()
