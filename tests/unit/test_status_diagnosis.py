"""`etcd-rdzv status`'s diagnosis: a pure function of the state and the keep-alive keys."""

from __future__ import annotations

from etcd_rdzv.layouts import (
    ClaimsLayout,
    Culprit,
    Departure,
    NodeIdentity,
    RunPaths,
    TorchLayout,
    VersionEnd,
    rank_of,
)
from etcd_rdzv.protocol import RendezvousState, Status
from etcd_rdzv.status import VersionHistory, diagnose

RUN = "/torchelastic/p2p/run_job/rdzv"
TORCH = TorchLayout(RunPaths("/torchelastic/p2p/run_job"))
CLAIMS = ClaimsLayout(RunPaths("/torchelastic/p2p/run_job"))


def key(version: int, rank: int) -> str:
    return f"{RUN}/v_{version}/rank_{rank}"


def host(name: str, pid: int | None = None) -> NodeIdentity:
    return NodeIdentity(host=name, addr=None, pid=pid)


def state(
    status: Status, n: int, confirmed: list[int] | None = None, waiting: int | None = None
) -> RendezvousState:
    return RendezvousState(
        status=status,
        version=7,
        participants=tuple(range(n)),
        keep_alives=None if confirmed is None else tuple(key(7, r) for r in confirmed),
        num_workers_waiting=waiting,
    )


def test_no_state_and_no_counter_means_nobody_joined() -> None:
    assert diagnose(TORCH, None, [], {}) == "no rendezvous state: nobody has joined yet"


def test_no_state_after_versions_means_the_last_one_went_away() -> None:
    text = diagnose(TORCH, None, [], {}, version_counter=3)
    assert text.startswith("no rendezvous state: version 3 expired or was torn down")


def test_joinable_below_min_waits_for_more_nodes() -> None:
    text = diagnose(TORCH, state(Status.JOINABLE, 3), [], {}, 4)
    assert text == "joinable with 3 participants (min 4): waiting for 1 more node"


def test_joinable_at_min_is_in_its_last_call() -> None:
    text = diagnose(TORCH, state(Status.JOINABLE, 2), [], {}, 2, max_nodes=4)
    assert text.startswith("joinable with 2 participants (min 2, max 4): min reached, last call")


def test_joinable_without_min_says_min_is_unknown() -> None:
    text = diagnose(TORCH, state(Status.JOINABLE, 1), [], {})
    assert text.startswith("joinable with 1 participant (min unknown)")


def test_frozen_names_unconfirmed_ranks_and_where_they_were_seen() -> None:
    frozen = state(Status.FROZEN, 6, confirmed=[0, 1, 3, 4])
    identities = {2: host("host-b", 12), 5: host("host-e")}
    text = diagnose(TORCH, frozen, [key(7, r) for r in (0, 1, 2, 3, 4, 5)], identities)
    assert text == (
        "frozen: ranks 2 and 5 have not confirmed "
        "(4 of 6 confirmed; last seen on host-b (pid 12) and host-e)"
    )


def test_frozen_rank_without_any_key_says_so() -> None:
    text = diagnose(TORCH, state(Status.FROZEN, 2, confirmed=[0]), [key(7, 0)], {0: host("a")})
    assert text == (
        "frozen: rank 1 has not confirmed (1 of 2 confirmed; no keep-alive key from them yet)"
    )


def test_final_with_waiting_nodes_means_re_rendezvous() -> None:
    final = state(Status.FINAL, 2, confirmed=[0, 1], waiting=2)
    text = diagnose(TORCH, final, [key(7, 0), key(7, 1)], {})
    assert text == "final with 2 nodes waiting: members will re-rendezvous (2 members now)"


def test_final_with_a_missing_keep_alive_will_be_torn_down() -> None:
    final = state(Status.FINAL, 3, confirmed=[0, 1, 2], waiting=0)
    text = diagnose(TORCH, final, [key(7, 0), key(7, 2)], {})
    assert text == "final: rank 1's keep-alive is missing: the version will be torn down"


def test_final_with_several_missing_keep_alives_and_waiting_nodes() -> None:
    final = state(Status.FINAL, 3, confirmed=[0, 1, 2], waiting=1)
    text = diagnose(TORCH, final, [key(7, 0)], {})
    assert text == (
        "final: the keep-alives of ranks 1 and 2 are missing: the version will be torn down; "
        "1 node waiting"
    )


def test_healthy_final() -> None:
    final = state(Status.FINAL, 2, confirmed=[0, 1], waiting=0)
    text = diagnose(TORCH, final, [key(7, 0), key(7, 1)], {})
    assert text == "final with 2 participants: complete, every keep-alive is live"


def test_closed_and_setup() -> None:
    assert diagnose(TORCH, RendezvousState(Status.CLOSED), [], {}) == "closed: no node can join"
    assert diagnose(TORCH, RendezvousState(Status.SETUP), [], {}).startswith(
        "setup: a node is opening"
    )


def test_identity_parsing_tolerates_torch_nodes_and_garbage() -> None:
    assert NodeIdentity.parse('{"host": "h", "addr": "10.0.0.1", "pid": 9}') == NodeIdentity(
        "h", "10.0.0.1", 9
    )
    assert NodeIdentity.parse("") is None  # torch's nodes write no identity
    assert NodeIdentity.parse("[1]") is None
    assert NodeIdentity.parse('{"pid": "x"}') == NodeIdentity(None, None, None)
    assert rank_of(key(7, 12)) == 12
    assert rank_of(f"{RUN}/v_7/trace_context") is None


def test_under_claims_a_live_keep_alive_key_is_the_confirmation() -> None:
    # A v3 run's frozen document lists no confirmation until final: the keys are the claims.
    frozen = state(Status.FROZEN, 3, confirmed=[])
    live = [key(7, 0), key(7, 1)]
    text = diagnose(CLAIMS, frozen, live, {0: host("a"), 1: host("b")})
    assert text == (
        "frozen: rank 2 has not confirmed (2 of 3 confirmed; no keep-alive key from them yet)"
    )
    # The same keys in torch's layout: confirmed only once the document lists them.
    assert diagnose(TORCH, frozen, live, {}).startswith("frozen: ranks 0, 1 and 2 have not")


def test_history_blames_the_node_that_neither_left_nor_came_back() -> None:
    """SIGKILL of rank 0 mid-training: the survivors' workers fail at once and they leave
    before rank 0's keep-alive expires; the version ends as 'members left', and only the
    next version's members show that rank 0 never came back."""
    t = 1_800_000_000.0
    a, b, c = (NodeIdentity("vm", None, pid, 10.0, at=t) for pid in (100, 101, 102))
    ending = VersionEnd("members_left", (Culprit(2, c),), b, stayed=(Culprit(0, a), Culprit(1, b)))
    left = (Departure(1, b, "rendezvous_again"), Departure(2, c, "rendezvous_again"))
    back = frozenset({("vm", 101), ("vm", 102)})
    text = VersionHistory(1, ending, left, back).describe()
    assert "when rank 2 (vm, pid 102) left to rendezvous again" in text
    assert "rank 0 (vm, pid 100) neither left nor came back in version 2" in text
    assert "rank 1 (vm, pid 101) left" in text  # it left later: not blamed
    assert text.count("rank 2 (vm, pid 102)") == 1
    # While the next version is not final, who came back is not known yet: no verdict.
    unsure = VersionHistory(1, ending, left, None).describe()
    assert "rank 0 (vm, pid 100) had not left when it was torn down" in unsure
    assert "died" not in unsure


def test_history_of_an_expired_frozen_version_names_who_never_confirmed() -> None:
    t = 1_800_000_000.0
    stalled, seer = NodeIdentity("vm-b", None, 7, 10.0), NodeIdentity("vm-a", None, 5, at=t)
    ending = VersionEnd("frozen_expired", (Culprit(1, stalled),), seer)
    text = VersionHistory(3, ending, ()).describe()
    assert text.startswith("version 3: expired at ")
    assert "while frozen: rank 1 (vm-b, pid 7) never confirmed (seen by vm-a (pid 5))" in text
    assert VersionHistory(4, None, ()).describe() == (
        "version 4: ended without a record (it expired, or torch's nodes ended it)"
    )
