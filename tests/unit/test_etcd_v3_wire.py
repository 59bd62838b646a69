"""The v3 transport's pure parts: gateway JSON and error meaning (the watch stream's framing is
tests/unit/test_gateway_http.py's)."""

from __future__ import annotations

import base64

import pytest

from etcd_rdzv.errors import EtcdRejectedError
from etcd_rdzv.kv import Change, OutcomeUnknown
from etcd_rdzv.kv import etcd_v3 as wire
from etcd_rdzv.kv.gateway_http import AnswerLost


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_events_decode_puts_and_deletes() -> None:
    put = {"kv": {"key": b64("/a"), "value": b64("v"), "mod_revision": "7"}}
    deleted = {"type": "DELETE", "kv": {"key": b64("/a"), "mod_revision": "8"}}
    assert wire._change(put) == Change("/a", "v", 7)
    assert wire._change(deleted).deleted


def test_prefix_end_bounds_exactly_the_keys_below() -> None:
    end = wire._prefix_end("/run/rdzv/")
    below, sibling = "/run/rdzv/zzz", "/run/rdzvx"
    assert below < end
    assert sibling >= end  # shares the name's start, yet is outside


@pytest.mark.parametrize(
    "body",
    [
        # etcd 3.4/3.5 gateway
        b'{"error": "etcdserver: request timed out", "code": 14,'
        b' "message": "etcdserver: request timed out"}',
        # etcd 3.6 gateway: no "error" field
        b'{"code": 14, "message": "etcdserver: request timed out", "details": []}',
    ],
)
def test_a_write_that_timed_out_in_etcd_is_of_unknown_outcome(body: bytes) -> None:
    error = wire._gateway_error(503, wire._json(body), body)
    outcome, raised = wire._classify(error, "/k", "where", idempotent=False)
    assert outcome == "outcome_unknown" and isinstance(raised, OutcomeUnknown)
    # The same failure of a read is simply retried.
    assert wire._classify(error, "/k", "where", idempotent=True) == ("unavailable", None)


def test_no_leader_is_retried_even_for_writes() -> None:
    body = b'{"code": 14, "message": "etcdserver: no leader"}'
    error = wire._gateway_error(503, wire._json(body), body)
    assert wire._classify(error, "/k", "where", idempotent=False) == ("leader_election", None)


def test_a_lost_answer_is_retried_only_when_repeating_is_harmless() -> None:
    lost = AnswerLost("h:1", TimeoutError("read timed out"))
    assert wire._classify(lost, "/k", "where", idempotent=True) == ("unavailable", None)
    assert isinstance(wire._classify(lost, "/k", "where", idempotent=False)[1], OutcomeUnknown)


def test_a_server_without_the_gateway_is_named_with_what_to_do() -> None:
    error = wire._gateway_error(404, None, b"404 page not found\n")
    outcome, raised = wire._classify(error, "/k", "etcd at h:1: get /k", idempotent=True)
    assert outcome == "no_v3_api"
    assert isinstance(raised, wire.V3ApiUnavailable) and isinstance(raised, EtcdRejectedError)
    assert "etcd at h:1" in str(raised) and "etcd_api=v2" in str(raised)


def test_permission_denied_is_final_and_says_what_to_check() -> None:
    body = b'{"code": 7, "message": "etcdserver: permission denied"}'
    error = wire._gateway_error(403, wire._json(body), body)
    outcome, raised = wire._classify(error, "/k", "where", idempotent=True)
    assert outcome == "permission_denied"
    assert isinstance(raised, EtcdRejectedError) and "role" in str(raised)


def test_leases_are_granted_longer_than_asked() -> None:
    assert wire._lease_seconds(10) == 11
    assert wire._lease_seconds(0.2) == 2
