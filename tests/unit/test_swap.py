"""The one compare-and-swap loop, over the in-memory etcd (which passes the transports'
contract suite): races lost and decided again, lost answers, bounds."""

from __future__ import annotations

import pytest

from etcd_rdzv.kv import Entry, KvError
from etcd_rdzv.kv.base import OutcomeUnknown
from etcd_rdzv.kv.memory import MemoryEtcd, MemoryKeyValue
from etcd_rdzv.retry import Backoff
from etcd_rdzv.swap import Delete, Keep, Put, SwapExhausted, swap

KEY = "/run/counter"
NO_WAIT = Backoff(initial=0.0, maximum=0.0, max_attempts=5)


def increment(entry: Entry | None) -> Put[int]:
    value = 1 if entry is None else int(entry.value) + 1
    return Put(str(value), value)


def test_it_creates_an_absent_key_and_swaps_a_present_one() -> None:
    kv = MemoryEtcd().client()
    assert swap(kv, KEY, increment)[0] == 1
    result, entry = swap(kv, KEY, increment)
    assert result == 2 and entry is not None and kv.get(KEY).value == "2"


def test_a_lost_race_is_decided_again_from_the_winners_value() -> None:
    etcd = MemoryEtcd()
    mine, theirs = etcd.client(), etcd.client()
    mine.put(KEY, "5")
    stale = mine.get(KEY)
    theirs.put(KEY, "9")  # wins the race after our read
    lost: list[tuple[int, str]] = []
    seen: list[str | None] = []

    def decide(entry: Entry | None) -> Put[int]:
        seen.append(None if entry is None else entry.value)
        return increment(entry)

    result, _ = swap(mine, KEY, decide, current=stale, on_lost=lambda *a: lost.append(a))
    assert (result, seen, lost) == (10, ["5", "9"], [(1, "compare_failed")])


def test_a_keep_writes_nothing_and_a_delete_deletes_as_read() -> None:
    kv = MemoryEtcd().client()
    kv.put(KEY, "1")
    revision = kv.get(KEY).revision
    assert swap(kv, KEY, lambda entry: Keep("kept"))[0] == "kept"
    assert kv.get(KEY).revision == revision
    assert swap(kv, KEY, lambda entry: Delete(True))[0] is True
    assert swap(kv, KEY, lambda entry: Delete(True)) == (True, None)  # absent: nothing to do


class LosesAnswers(MemoryKeyValue):
    """Loses the answer to the next compare-and-swap, after applying it."""

    lose = 1

    def compare_and_swap(
        self, key: str, value: str, expected: Entry, ttl: float | None = None
    ) -> Entry:
        written = super().compare_and_swap(key, value, expected, ttl)
        if self.lose:
            self.lose -= 1
            raise OutcomeUnknown("answer lost")
        return written


def test_a_lost_answer_is_raised_unless_the_decision_recognizes_its_own_write() -> None:
    etcd = MemoryEtcd()
    kv = LosesAnswers(etcd)
    kv.put(KEY, "a")
    with pytest.raises(OutcomeUnknown):
        swap(kv, KEY, lambda entry: Put("a+b", None))
    kv.lose = 1

    def append_once(entry: Entry | None) -> Put[str] | Keep[str]:
        assert entry is not None
        return Keep(entry.value) if entry.value.endswith("+c") else Put(entry.value + "+c", "")

    # The write applied; re-read, the decision sees it and writes nothing more.
    result, _ = swap(kv, KEY, append_once, retry_unknown=True)
    assert result == "a+b+c" and kv.get(KEY).value == "a+b+c"


def test_it_gives_up_after_its_attempts_when_the_key_keeps_changing() -> None:
    etcd = MemoryEtcd()
    mine, theirs = etcd.client(), etcd.client()
    mine.put(KEY, "0")

    def racing(entry: Entry | None) -> Put[int]:
        theirs.put(KEY, "moved")  # someone always writes between our read and our write
        return Put("mine", 0)

    with pytest.raises(SwapExhausted) as exhausted:
        swap(mine, KEY, racing, backoff=NO_WAIT)
    assert isinstance(exhausted.value, KvError) and "5 compare-and-swaps" in str(exhausted.value)
