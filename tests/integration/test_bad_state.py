"""Garbage in a run's keys: a clear `CorruptStateError` naming the key, and nothing rewritten.

Each case writes raw bytes into the run's state key (`.../rdzv/active_version`) or its version
counter through etcd's own HTTP API, not through our transport, so nothing of ours can tidy the
value on the way in. One agent (a real participant process) then tries to rendezvous. It must
answer with `CorruptStateError` naming the key and the problem, leave the key exactly as written
(same bytes, same modification revision), and touch no key outside its run's prefix.

The etcd server is this module's own, so the key set of the whole keyspace is ours to compare.
One participant process serves every case of one API (starting torch per case would dominate the
runtime); it is replaced if a case ever kills it.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from etcd_rdzv_devtools.local_etcd import LocalEtcd, start_local_etcd
from tests.conftest import etcd_keys, only_etcd_api
from tests.support.harness import Participant, ParticipantGroup

BACKEND = "etcd-rdzv"
RUN_ID = "bad-state"
RUN_PREFIX = f"/torchelastic/p2p/run_{RUN_ID}"
STATE_KEY = f"{RUN_PREFIX}/rdzv/active_version"
COUNTER_KEY = f"{RUN_PREFIX}/rdzv/version_counter"
ANSWER_TIMEOUT = 30.0
# Keys of others next to the run: run ids that share its prefix as a string, and a stranger.
NEIGHBOURS = {
    "/torchelastic/p2p/run_bad-state-neighbour/rdzv/active_version": (
        b'{"status":"final","version":"3","participants":[0],"keep_alives":[]}'
    ),
    "/torchelastic/p2p/run_bad-state-neighbour/rdzv/version_counter": b"3",
    "/torchelastic/p2p/run_bad-statex/rdzv/version_counter": b"not ours either",
    "/unrelated/config": b"\x00\xffkeep me",
}

# --- raw access through etcd's own HTTP API ------------------------------------------------------

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Raw:
    """A key's value as etcd serves it, and the revision (v3) or index (v2) it was written at."""

    value: bytes
    modified: int


def _http(url: str, *, method: str, data: bytes | None = None, form: bool = False) -> Any:
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with _DIRECT.open(request, timeout=10) as response:
        return json.loads(response.read())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def raw_put(server: LocalEtcd, api: str, key: str, value: bytes) -> None:
    """Write `value` byte for byte (v3), or as etcd's v2 form decoding makes of it (v2)."""
    if api == "v3":
        body = json.dumps({"key": _b64(key.encode()), "value": _b64(value)}).encode()
        _http(f"{server.client_url}/v3/kv/put", method="POST", data=body)
    else:
        form = b"value=" + urllib.parse.quote_from_bytes(value, safe="").encode("ascii")
        _http(f"{server.client_url}/v2/keys{key}", method="PUT", data=form, form=True)


def raw_get(server: LocalEtcd, api: str, key: str) -> Raw | None:
    if api == "v3":
        body = json.dumps({"key": _b64(key.encode())}).encode()
        reply = _http(f"{server.client_url}/v3/kv/range", method="POST", data=body)
        kvs = reply.get("kvs") or []
        if not kvs:
            return None
        return Raw(base64.b64decode(kvs[0].get("value", "")), int(kvs[0]["mod_revision"]))
    try:
        reply = _http(f"{server.client_url}/v2/keys{key}?quorum=true", method="GET")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    node = reply["node"]
    # v2 serves values as JSON strings: bytes that are not UTF-8 come back as U+FFFD.
    return Raw(str(node.get("value", "")).encode("utf-8"), int(node["modifiedIndex"]))


def raw_delete(server: LocalEtcd, api: str, key: str) -> None:
    if api == "v3":
        body = json.dumps({"key": _b64(key.encode())}).encode()
        _http(f"{server.client_url}/v3/kv/deleterange", method="POST", data=body)
        return
    try:
        _http(f"{server.client_url}/v2/keys{key}", method="DELETE")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise


def outside_the_run(server: LocalEtcd, api: str) -> dict[str, Raw | None]:
    """Every key of the keyspace outside this run's prefix, with its value and revision."""
    keys = {
        key
        for key in etcd_keys(server, api, "/")
        if key != RUN_PREFIX and not key.startswith(RUN_PREFIX + "/")
    }
    return {key: raw_get(server, api, key) for key in sorted(keys)}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(etcd_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """This module's own etcd, so the whole keyspace is the run's and its planted neighbours'."""
    etcd = start_local_etcd(
        enable_v2=etcd_api == "v2", data_dir=tmp_path_factory.mktemp(f"etcd-bad-state-{etcd_api}")
    )
    try:
        for key, value in NEIGHBOURS.items():
            raw_put(etcd, etcd_api, key, value)
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture(scope="module")
def agents(
    server: LocalEtcd, etcd_api: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ParticipantGroup]:
    group = ParticipantGroup(
        tmp_path_factory.mktemp(f"bad-state-agents-{etcd_api}"),
        endpoint=server.endpoint,
        run_id=RUN_ID,
        min_nodes=1,
        max_nodes=1,
        # The API explicitly: the environment fixture that sets it is per test, this is per module.
        conf={"etcd_api": etcd_api, "timeout": "20", "last_call_timeout": "1"},
    )
    with group:
        yield group


@pytest.fixture
def agent(agents: ParticipantGroup) -> Participant:
    """The module's agent, or a fresh one if an earlier case left it dead."""
    live = [node for node in agents.members if node.process.poll() is None]
    if live:
        return live[-1]
    (node,) = agents.start(1, backend=BACKEND)
    return node


# --- the cases -----------------------------------------------------------------------------------

VALID_FINAL = b'{"status":"final","version":"1","participants":[0],"keep_alives":[]}'


def _obj(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _case(name: str, value: bytes, problem: str) -> Any:
    return pytest.param(value, problem, id=name)


# _case(id, bytes written to the key, words the error must contain)
STATE_CASES = [
    _case("garbage", b"this is not a rendezvous state {", "not JSON"),
    _case("empty", b"", "not JSON"),
    _case("truncated", VALID_FINAL[:30], "not JSON"),
    _case("binary", b"\xff\xfe\x00\x80\x81garbage\xc3\x28", "not JSON|not UTF-8"),
    _case("binary-status", b'{"status":"joinable\xff","version":"1","participants":[0]}', "status"),
    _case("deeply-nested", b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    _case("list", b"[0, 1, 2]", "not a JSON object"),
    _case("number", b"42", "not a JSON object"),
    _case("string", b'"joinable"', "not a JSON object"),
    _case("null", b"null", "not a JSON object"),
    _case("empty-object", b"{}", "unknown status"),
    _case("status-number", _obj(status=7, version="1", participants=[0]), "unknown status"),
    _case(
        "unknown-status", _obj(status="running", version="1", participants=[0]), "unknown status"
    ),
    _case("version-word", _obj(status="joinable", version="one", participants=[0]), "version"),
    _case(
        "version-float",
        _obj(status="joinable", version=1.5, participants=[]),
        "version",
    ),
    _case("version-bool", _obj(status="joinable", version=True, participants=[0]), "version"),
    _case("version-list", _obj(status="joinable", version=[1], participants=[0]), "version"),
    _case("version-negative", _obj(status="joinable", version="-3", participants=[0]), "negative"),
    _case("version-negative-int", _obj(status="final", version=-3, participants=[0]), "negative"),
    _case(
        "version-infinite",
        b'{"status":"joinable","version":Infinity,"participants":[0]}',
        "version",
    ),
    _case("version-missing", _obj(status="frozen", participants=[0]), "without a version"),
    _case(
        "participants-string", _obj(status="joinable", version="1", participants="0,1"), "partic"
    ),
    _case(
        "participants-object", _obj(status="joinable", version="1", participants={"0": 1}), "partic"
    ),
    _case("participants-words", _obj(status="joinable", version="1", participants=["a"]), "partic"),
    _case("participants-gap", _obj(status="joinable", version="1", participants=[0, 2]), "partic"),
    _case(
        "keep-alives-not-list",
        _obj(status="final", version="1", participants=[0], keep_alives="rank_0"),
        "keep_alives",
    ),
    _case(
        "waiting-not-int",
        _obj(
            status="final", version="1", participants=[0], keep_alives=[], num_workers_waiting="x"
        ),
        "num_workers_waiting",
    ),
]

COUNTER_CASES = [
    _case("garbage", b"seven", "not an integer"),
    _case("empty", b"", "not an integer"),
    _case("float", b"1.5", "not an integer"),
    _case("binary", b"\xff\x00\x01", "not an integer|not UTF-8"),
    _case("json-object", b'{"version": 1}', "not an integer"),
    _case("negative", b"-5", "negative"),
]


def _rendezvous_error(agent: Participant) -> dict[str, Any]:
    agent.send({"cmd": "rendezvous"})
    return agent.expect("error", timeout=ANSWER_TIMEOUT)


def _assert_clear_error(error: dict[str, Any], key: str, problem: str) -> None:
    detail = f"{error.get('type')}: {error.get('message')}\n{error.get('traceback', '')}"
    assert error["type"] == "CorruptStateError", f"not a CorruptStateError: {detail}"
    assert f"etcd key {key!r}" in error["message"], f"the key is not named: {detail}"
    # "a|b": either words will do (binary bytes are "not UTF-8" over v3, "not JSON" over v2,
    # where etcd itself hands them out as U+FFFD).
    assert any(words in error["message"] for words in problem.split("|")), (
        f"{problem!r} not said: {detail}"
    )
    assert "delete the key" in error["message"], f"no advice on what to do: {detail}"


@pytest.mark.parametrize(
    ("written", "problem"),
    STATE_CASES,
)
def test_corrupt_state_key_is_a_clear_error_and_is_never_overwritten(
    server: LocalEtcd, etcd_api: str, agent: Participant, written: bytes, problem: str
) -> None:
    raw_put(server, etcd_api, COUNTER_KEY, b"0")
    raw_put(server, etcd_api, STATE_KEY, written)
    before = raw_get(server, etcd_api, STATE_KEY)
    others_before = outside_the_run(server, etcd_api)
    assert before is not None

    error = _rendezvous_error(agent)

    _assert_clear_error(error, STATE_KEY, problem)
    assert raw_get(server, etcd_api, STATE_KEY) == before, "the state key was rewritten"
    assert outside_the_run(server, etcd_api) == others_before
    assert set(others_before) == set(NEIGHBOURS)


@pytest.mark.parametrize(
    ("written", "problem"),
    COUNTER_CASES,
)
def test_corrupt_version_counter_is_a_clear_error_and_is_never_overwritten(
    server: LocalEtcd, etcd_api: str, agent: Participant, written: bytes, problem: str
) -> None:
    # No state: the agent opens a version, which takes the next number from the counter.
    raw_delete(server, etcd_api, STATE_KEY)
    raw_put(server, etcd_api, COUNTER_KEY, written)
    before = raw_get(server, etcd_api, COUNTER_KEY)
    others_before = outside_the_run(server, etcd_api)
    assert before is not None

    error = _rendezvous_error(agent)

    _assert_clear_error(error, COUNTER_KEY, problem)
    assert raw_get(server, etcd_api, COUNTER_KEY) == before, "the version counter was rewritten"
    assert outside_the_run(server, etcd_api) == others_before
    assert set(others_before) == set(NEIGHBOURS)


@only_etcd_api("v3")  # over v2 etcd itself serves such bytes as U+FFFD: nobody can tell
def test_state_that_is_json_but_not_utf8_is_a_clear_error_and_is_never_overwritten(
    server: LocalEtcd, etcd_api: str, agent: Participant
) -> None:
    """Bytes that are not UTF-8 were never written by a rendezvous, even inside valid JSON."""
    written = b'{"status":"joinable","version":"1","participants":[],"note":"\xff\xfe"}'
    raw_put(server, etcd_api, COUNTER_KEY, b"1")
    raw_put(server, etcd_api, STATE_KEY, written)
    before = raw_get(server, etcd_api, STATE_KEY)

    error = _rendezvous_error(agent)

    _assert_clear_error(error, STATE_KEY, "UTF-8")
    assert raw_get(server, etcd_api, STATE_KEY) == before, "the state key was rewritten"


def test_agent_recovers_once_the_corrupt_key_is_deleted(
    server: LocalEtcd, etcd_api: str, agent: Participant
) -> None:
    """The advice in the error works: delete the key, and the same agent rendezvouses."""
    raw_put(server, etcd_api, COUNTER_KEY, b"0")
    raw_put(server, etcd_api, STATE_KEY, b"garbage")
    _assert_clear_error(_rendezvous_error(agent), STATE_KEY, "not JSON")

    raw_delete(server, etcd_api, STATE_KEY)
    result = agent.rendezvous(timeout=ANSWER_TIMEOUT)

    assert (result["rank"], result["world_size"]) == (0, 1)
    assert set(outside_the_run(server, etcd_api)) == set(NEIGHBOURS)


def test_the_agent_served_every_case_without_dying(agents: ParticipantGroup) -> None:
    """No case crashed the agent process (it answered each with an error event instead)."""
    assert agents.members, "no agent was started"
    assert [node.name for node in agents.members if node.process.poll() is not None] == []
