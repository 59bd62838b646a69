"""The advice the transports add to errors whose cause is on the operator's side."""

from __future__ import annotations

import http.client
import ssl

from etcd_rdzv.errors import EtcdRejectedError
from etcd_rdzv.kv import advice
from etcd_rdzv.kv.etcd_v3 import _classify, _explain, _GatewayError
from etcd_rdzv.kv.gateway_http import AnswerLost

WHERE = "etcd at 127.0.0.1:2379: get /k"


def test_a_connection_closed_without_reply_over_http_suggests_https() -> None:
    closed = AnswerLost("127.0.0.1:2379", http.client.RemoteDisconnected("closed"))
    assert _explain(closed, plain_http=True) == advice.PLAIN_HTTP_TO_TLS
    assert "protocol=https" in advice.PLAIN_HTTP_TO_TLS
    assert _explain(closed, plain_http=False) is None  # over https it means something else
    timed_out = AnswerLost("127.0.0.1:2379", TimeoutError("timed out"))
    assert _explain(timed_out, plain_http=True) is None


def test_a_handshake_the_server_ended_without_a_client_certificate_asks_for_one() -> None:
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)")
    assert "may require a client certificate" in advice.tls_failure(WHERE, eof, False)
    # With a certificate given, or a failure of our own check of the server, no such guess.
    assert "may require" not in advice.tls_failure(WHERE, eof, True)
    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert "may require" not in advice.tls_failure(WHERE, unverified, False)
    assert advice.tls_failure(WHERE, unverified, False).endswith("Check cacert, cert and key.")


def test_a_client_certificate_with_a_cn_refused_by_the_gateway_says_what_to_do() -> None:
    refusal = _GatewayError(
        400,
        None,
        "CommonName of client sending a request against gateway will be ignored and not used "
        "as expected",
    )
    outcome, error = _classify(refusal, "/k", WHERE, idempotent=True)
    assert outcome == "error"  # a refusal, not a passing failure: no retries until the timeout
    assert isinstance(error, EtcdRejectedError)
    message = str(error)
    assert message.startswith(WHERE)
    assert "a client certificate without a CN" in message
    assert "client certificates without etcd users" in message
    assert "docs/reliability.md#security" in message
