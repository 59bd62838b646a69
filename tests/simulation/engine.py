"""The simulation engine: one process, a virtual clock, a seeded scheduler, one actor at a time.

Every node of a simulated run is the real `EtcdRendezvous`, running in a greenlet of its own
(an *actor*), as are its keep-alive refreshers. An actor runs only when the scheduler switches
to it, and switches back at each *step*: before every etcd request, and whenever it sleeps,
waits for a watch or for its stop event. So exactly one actor runs at a time, the order of
steps comes from the seed alone, and time is virtual: when no actor can run, the clock jumps
to the next timer, lease expiry or scheduled fault. A schedule is replayed by running its seed
again. (Greenlets, not threads: the same blocking code, a switch costs a microsecond instead
of a thread handoff's 40.)

The etcd is a `MemoryEtcd` on the virtual clock; each node talks to it through a
`SimulatedKeyValue`, whose requests are steps and whose watches wait on virtual time.
"""

from __future__ import annotations

import heapq
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from greenlet import greenlet

from etcd_rdzv.kv.base import Change
from etcd_rdzv.kv.memory import MemoryEtcd, MemoryKeyValue
from etcd_rdzv.runtime import Runtime

# Virtual wall clock at simulated time 0 (2026-01-01): state documents carry stamps.
EPOCH = 1_767_225_600.0


class Crashed(BaseException):
    """Raised in every actor of a node that crashed, at its next step: unwinds its thread the
    way a killed process stops (no `except Exception` in the protocol catches it)."""


@dataclass(eq=False)
class Actor:
    """A thread the scheduler runs one step at a time: a node's main loop or a refresher."""

    name: str
    node: str
    sim: Simulation
    glet: greenlet | None = None
    killed: bool = False
    finished: bool = False
    queued: bool = False  # in the ready list
    # Bumped at every block: a timer or watch registered before it is stale.
    epoch: int = 0

    # The `runtime.Background` protocol. A stopped refresher exits at its next step; nothing
    # waits for it (it cannot run while its owner holds the turn).
    def join(self, timeout: float | None = None) -> None:
        return None

    def is_alive(self) -> bool:
        return not self.finished


@dataclass
class Node:
    """The scheduling state of one node (process): paused, or killed with all its actors."""

    name: str
    paused_until: float = 0.0
    actors: list[Actor] = field(default_factory=list)


class Simulation:
    """The scheduler, the clock and the etcd of one schedule."""

    def __init__(self, seed: int, *, trace_limit: int = 400) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.etcd = MemoryEtcd(clock=lambda: self.now)
        self.steps = 0
        self.trace: list[str] = []
        self._trace_limit = trace_limit
        self.current: Actor | None = None
        self.errors: list[str] = []  # exceptions that escaped an actor
        self._nodes: dict[str, Node] = {}
        self._ready: list[Actor] = []
        self._timers: list[tuple[float, int, int, Actor]] = []
        self._sequence = 0
        self._watch_keys: dict[str, set[Actor]] = {}
        self._watch_prefixes: dict[Actor, str] = {}
        self._watching: dict[Actor, tuple[str, bool]] = {}
        self._seen_revision = self.etcd.revision
        self._scheduler = greenlet.getcurrent()
        self._events: list[tuple[float, int, str, Callable[[], None]]] = []
        # Called with each actor picked to run, before it runs (a fault may kill its node).
        self.on_pick: Callable[[Actor], None] = lambda actor: None
        # Called with each change of etcd, in order, after the step that made it.
        self.on_change: Callable[[Change], None] = lambda change: None

    # --- nodes and actors ----------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return self._nodes.setdefault(name, Node(name))

    def spawn(self, node: str, name: str, target: Callable[[], None]) -> Actor:
        """An actor that runs `target` once scheduled."""
        actor = Actor(name, node, self)
        self.node(node).actors.append(actor)

        def body() -> None:
            try:
                if not actor.killed:
                    target()
            except Crashed:
                pass
            except Exception as error:  # the protocol crashed: a finding, not a hang
                self.errors.append(f"{actor.name}: {type(error).__name__}: {error}")
                self.note(actor.name, f"raised {type(error).__name__}: {error}")
            finally:
                actor.finished = True
                self._forget_watch(actor)

        actor.glet = greenlet(body, parent=self._scheduler)
        self._enqueue(actor)
        return actor

    def kill(self, node: str) -> None:
        """Crash a node: each of its actors raises `Crashed` at its next step."""
        for actor in self.node(node).actors:
            if not actor.finished and not actor.killed:
                actor.killed = True
                self._wake(actor)
        self.node(node).actors = [a for a in self.node(node).actors if not a.finished]

    def pause(self, node: str, until: float) -> None:
        """SIGSTOP a node until `until`: none of its actors is scheduled meanwhile."""
        self.node(node).paused_until = max(self.node(node).paused_until, until)

    # --- from actor threads --------------------------------------------------------------------

    def step(self, what: str) -> None:
        """A request of the running actor: it reaches etcd after a latency drawn from the seed
        (mostly a few milliseconds, sometimes far longer), meanwhile the others run. Without
        it, two requests of one node at the same virtual instant could never be separated by
        another node's."""
        latency = self.rng.expovariate(1 / 0.002)
        if self.rng.random() < 0.01:
            latency += self.rng.uniform(0.05, 1.0)  # a slow request: GC pause, lost packet
        self._block(what, at=self.now + latency)

    def sleep(self, seconds: float, what: str = "sleep") -> None:
        self._block(what, at=self.now + max(0.0, seconds))

    def wait_for_change(self, key: str, recursive: bool, until: float) -> None:
        """Block until a change of `key` (or below it) after what was just read, or `until`."""
        self._block(f"watch {key}", at=until, watch=(key, recursive))

    def note(self, who: str, what: str) -> None:
        if len(self.trace) >= self._trace_limit:
            del self.trace[: self._trace_limit // 4]
        self.trace.append(f"{self.steps:>7} t={self.now:9.3f} {who}: {what}")

    def _block(
        self, what: str, *, at: float | None = None, watch: tuple[str, bool] | None = None
    ) -> None:
        actor = self.current
        assert actor is not None, "a step outside any actor"
        actor.epoch += 1
        if at is None:
            self._enqueue(actor)
        else:
            self._sequence += 1
            heapq.heappush(self._timers, (at, self._sequence, actor.epoch, actor))
        if watch is not None:
            self._watch(actor, *watch)
        self._scheduler.switch()
        if actor.killed:
            raise Crashed
        self.note(actor.name, what)

    # --- the scheduler -------------------------------------------------------------------------

    def at(self, when: float, what: str, action: Callable[[], None]) -> None:
        """Run `action` (a fault, a node start) in the scheduler when the clock reaches `when`."""
        self._sequence += 1
        heapq.heappush(self._events, (when, self._sequence, what, action))

    def run_step(self) -> bool:
        """Run one actor's step; False when nothing can ever run again."""
        while True:
            self._fire_events()
            actor = self._next_ready()
            if actor is not None:
                break
            if not self._advance():
                return False
        self.on_pick(actor)
        self._switch_to(actor)
        self.steps += 1
        self._wake_watchers()
        return True

    def drain(self) -> None:
        """Kill every actor and let each unwind: no thread outlives the schedule."""
        for name in list(self._nodes):
            self.kill(name)
        for _ in range(100_000):
            alive = [a for n in self._nodes.values() for a in n.actors if not a.finished]
            if not alive:
                return
            for node in self._nodes.values():
                node.paused_until = 0.0
            for actor in alive:
                actor.killed = True
                self._wake(actor)
            while self._ready:
                actor = self._ready.pop()
                actor.queued = False
                if actor.finished:
                    continue
                self._switch_to(actor)

    def _switch_to(self, actor: Actor) -> None:
        """Run `actor` until its next step (or its end)."""
        assert actor.glet is not None
        self.current = actor
        actor.glet.switch()
        self.current = None

    def _next_ready(self) -> Actor | None:
        while self._ready:
            index = self.rng.randrange(len(self._ready))
            self._ready[index], self._ready[-1] = self._ready[-1], self._ready[index]
            actor = self._ready.pop()
            actor.queued = False
            if actor.finished:
                continue
            paused_until = self.node(actor.node).paused_until
            if paused_until > self.now and not actor.killed:
                self._sequence += 1
                heapq.heappush(self._timers, (paused_until, self._sequence, actor.epoch, actor))
                continue
            return actor
        return None

    def _advance(self) -> bool:
        """Move the clock to the next timer, lease expiry or event; False if there is none."""
        candidates = []
        while self._timers and self._stale(self._timers[0]):
            heapq.heappop(self._timers)
        if self._timers:
            candidates.append(self._timers[0][0])
        if self._events:
            candidates.append(self._events[0][0])
        expiry = self.etcd.next_expiry()
        if expiry is not None and (self._timers or self._watching):
            candidates.append(expiry)
        if not candidates:
            return False
        self.now = max(self.now, min(candidates))
        self.etcd.expire()
        self._wake_watchers()
        while self._timers and self._timers[0][0] <= self.now:
            _, _, epoch, actor = heapq.heappop(self._timers)
            if epoch == actor.epoch and not actor.finished:
                self._wake(actor)
        return True

    def _fire_events(self) -> None:
        while self._events and self._events[0][0] <= self.now:
            _, _, what, action = heapq.heappop(self._events)
            self.note("scheduler", what)
            action()

    @staticmethod
    def _stale(timer: tuple[float, int, int, Actor]) -> bool:
        _, _, epoch, actor = timer
        return epoch != actor.epoch or actor.finished

    def _wake(self, actor: Actor) -> None:
        """Make a blocked actor ready (its pending timer or watch goes stale)."""
        if actor.finished or actor.queued:
            return
        actor.epoch += 1
        self._forget_watch(actor)
        self._enqueue(actor)

    def _enqueue(self, actor: Actor) -> None:
        actor.queued = True
        self._ready.append(actor)

    # --- watches -------------------------------------------------------------------------------

    def _watch(self, actor: Actor, key: str, recursive: bool) -> None:
        self._watching[actor] = (key, recursive)
        if recursive:
            self._watch_prefixes[actor] = key.rstrip("/") + "/"
        else:
            self._watch_keys.setdefault(key, set()).add(actor)

    def _forget_watch(self, actor: Actor) -> None:
        watched = self._watching.pop(actor, None)
        if watched is None:
            return
        key, recursive = watched
        if recursive:
            self._watch_prefixes.pop(actor, None)
        else:
            self._watch_keys.get(key, set()).discard(actor)

    def _wake_watchers(self) -> None:
        if self.etcd.revision == self._seen_revision:
            return
        changes = self.etcd.changes_after(self._seen_revision)
        self._seen_revision = self.etcd.revision
        for change in changes:
            self.on_change(change)
        woken: list[Actor] = []
        for change in changes:
            woken.extend(self._watch_keys.get(change.key, ()))
            woken.extend(a for a, p in self._watch_prefixes.items() if change.key.startswith(p))
        # By name, not in set order: the schedule must not depend on hashing.
        for actor in sorted(set(woken), key=lambda a: a.name):
            self._wake(actor)


class SimulatedRuntime(Runtime):
    """A node's clock, sleep, threads and randomness, in a simulation."""

    def __init__(self, sim: Simulation, node: str) -> None:
        super().__init__(random.Random(sim.rng.getrandbits(64)))
        self._sim = sim
        self._node = node

    def monotonic(self) -> float:
        return self._sim.now

    def time(self) -> float:
        return EPOCH + self._sim.now

    def sleep(self, seconds: float) -> None:
        self._sim.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if not event.is_set():
            self._sim.sleep(seconds, "wait")
        return event.is_set()

    def start(self, target: Callable[[], None], name: str) -> Actor:
        index = sum(1 for a in self._sim.node(self._node).actors if a.name.startswith(name))
        return self._sim.spawn(self._node, f"{self._node}/{name}-{index}", target)


class SimulatedKeyValue(MemoryKeyValue):
    """A node's etcd client in a simulation: every request is a step; watches wait on the
    virtual clock for a change another actor makes."""

    def __init__(self, sim: Simulation, node: str, *, claims: bool) -> None:
        super().__init__(sim.etcd, claims=claims)
        self._sim = sim
        self._node = node

    @contextmanager
    def _request(self, operation: str, *, conditional: bool = False) -> Iterator[MemoryEtcd]:
        self._sim.step(operation)
        with super()._request(operation, conditional=conditional) as server:
            yield server

    def watch(
        self, key: str, after_revision: int, timeout: float, recursive: bool = False
    ) -> Change | None:
        if timeout <= 0:
            return None
        until = self._sim.now + timeout
        while True:
            with self._request("watch") as server:
                if after_revision < server.compacted:
                    return None
                change = server._first_change(key, after_revision, recursive)
                if change is not None:
                    return change if recursive else server._last_change(key)
            if self._sim.now >= until:
                return None
            self._sim.wait_for_change(key, recursive, until)
