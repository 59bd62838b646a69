"""Schedules of a whole run: nodes that are the real protocol, faults drawn from the seed, and
the invariants checked after every step.

`run(seed)` draws a `Scenario` from the seed (how many nodes, `--nnodes`, key layout, last
call, when each node starts, which faults strike when), runs it in a `Simulation`, and returns
an `Outcome`: the violations found, if any, with the trace of the last steps. The same seed
always runs the same schedule (`make simulate SEEDS=...` replays one).

Each node is what torchrun's agent does with the handler: `prepare`, then `next_rendezvous`;
while "training", every monitor interval it reads the state and restarts (rendezvous again)
when nodes wait (`protocol.nodes_waiting`, as `EtcdRdzvHandler.num_nodes_waiting`), or when a
worker fails (an injected fault).

Invariants, after every step:
- safety: no rank of a version handed to two nodes; every node of a version agrees on its
  world size and holds a rank below it; a node's membership is of the version final in etcd
  at the moment it is returned (no stale actor); every final document lists the keep-alive
  keys of ranks 0..n-1; versions open in increasing order; every state document decodes;
  no key is written outside the run's directory; no exception but the protocol's own errors
  leaves a node;
- liveness: once faults stop and every crashed node is restarted, a final version whose
  members all live and hold their ranks, at least min_nodes of them, forms within
  `Scenario.bound` seconds (derived from the TTLs).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from etcd_rdzv import protocol
from etcd_rdzv.config import ProtocolTtls, RendezvousConfig, parse_endpoints
from etcd_rdzv.errors import (
    ConfigurationError,
    CorruptStateError,
    EtcdRdzvError,
    EtcdUnavailableError,
    RendezvousClosedError,
    RendezvousTimeoutError,
)
from etcd_rdzv.kv import KvError
from etcd_rdzv.kv.base import Change
from etcd_rdzv.layouts import RunPaths
from etcd_rdzv.protocol import RendezvousState, Status
from etcd_rdzv.rank_policy import Assignment, RankPolicy
from etcd_rdzv.rendezvous import EtcdRendezvous, Membership
from etcd_rdzv.telemetry import NOOP_OBSERVER, Observer, Phase, PhaseScope
from tests.simulation.engine import Actor, SimulatedKeyValue, SimulatedRuntime, Simulation

RUN_ID = "sim"
PREFIX = "/torchelastic/p2p"
MONITOR_INTERVAL = 5.0  # torchrun's --monitor-interval default is 0.1 s; 5 s keeps schedules short
# How long after a crash a node's process is started again (a cluster manager's restart).
RESTART_DELAY = (1.0, 20.0)


@dataclass(frozen=True)
class Scenario:
    seed: int
    layout: str  # "claims" (over etcd v3) or "torch" (over v2, and torch's own backend)
    nodes: int
    min_nodes: int
    max_nodes: int
    last_call: float
    ttls: ProtocolTtls
    start_spread: float  # nodes start uniformly within this many seconds
    late_joiners: int  # nodes that start only after the faults stop
    # Nodes that start just as the first last call ends (the others start at once): their
    # claims race the holder's count and freeze.
    stragglers: int
    faults_until: float  # no fault strikes after this time
    crash_rate: float  # chance that a step of a node is its last (a crash at any step)
    pauses: int  # SIGSTOP of a node for longer than its TTLs
    outages: int  # etcd does not answer anyone for a while
    lost_answers: int  # a conditional write whose answer is lost (applied or not)
    lease_expiries: int  # a keep-alive lease expires early (etcd lost it, a clock jump)
    worker_failures: int  # a training node restarts its workers: it rendezvous again
    mismatch: bool  # one more node with another --nnodes: it must fail clearly, not hang
    # Kill the first node to reach one protocol point, as `--die-at` does for real processes
    # (tests/integration/test_agent_faults.py): a `DIE_AT` key, or None.
    die_at: str | None = None
    # How ranks are handed out (claims layout only: over v2 ranks are the join order).
    rank_policy: RankPolicy = field(default_factory=RankPolicy)

    @classmethod
    def from_seed(
        cls, seed: int, *, nodes: int | None = None, rank_policies: bool = False
    ) -> Scenario:
        """The scenario of `seed`. With `rank_policies`, a rank policy other than join order
        is drawn too, from a generator of its own: the rest of the schedule is the seed's."""
        scenario = cls._drawn(seed, nodes)
        if not rank_policies or scenario.layout != "claims":
            return scenario
        policy = random.Random(seed ^ 0x2A2A).choice(
            (
                RankPolicy("stable"),
                RankPolicy("stable"),
                RankPolicy("host_order"),
                RankPolicy("stable", rank0_node="n1"),
                RankPolicy("join_order", rank0_node="n0"),
            )
        )
        return dataclasses.replace(scenario, rank_policy=policy)

    @classmethod
    def _drawn(cls, seed: int, nodes: int | None) -> Scenario:
        rng = random.Random(seed)
        n = nodes or rng.choice((1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 8, 8, 12, 16, 32))
        elastic = rng.random() < 0.5
        min_nodes = rng.randint(max(1, n // 2), n) if elastic else n
        max_nodes = rng.randint(n, n + 2) if elastic else n
        faulty = rng.random() < 0.8
        keep_alive = rng.choice((3.0, 5.0, 10.0))

        def some(most: int) -> int:
            return rng.randint(0, most) if faulty else 0

        return cls(
            seed=seed,
            # torch's layout makes every join a compare-and-swap on one key: O(N^2) steps under
            # a random schedule, which is why etcd-rdzv takes claims over v3. Simulated up to
            # 256 nodes (v2 runs that large are rare; the benchmark measures them for real).
            layout=rng.choice(("claims", "torch")) if n <= 256 else "claims",
            nodes=n,
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            last_call=rng.choice((0.5, 1.0, 3.0)),
            ttls=ProtocolTtls.from_keep_alive(keep_alive),
            start_spread=rng.choice((0.0, 1.0, 10.0, 40.0)),
            late_joiners=rng.randint(0, 2) if n > 1 and rng.random() < 0.3 else 0,
            stragglers=rng.randint(1, max(1, n // 2)) if elastic and rng.random() < 0.3 else 0,
            faults_until=rng.uniform(5.0, 60.0) if faulty else 0.0,
            crash_rate=rng.choice((0.0, 0.002, 0.01, 0.03)) if faulty else 0.0,
            pauses=some(2),
            outages=some(2),
            lost_answers=some(4),
            lease_expiries=some(2),
            worker_failures=some(2),
            mismatch=rng.random() < 0.05,
        )

    @property
    def bound(self) -> float:
        """Seconds from the end of the faults to a final version, at most.

        The longest a dead or paused node's keys hold the others up is one TTL per state it
        can leave behind: a setup placeholder, a joinable state (or, under claims, the last
        call plus a joinable TTL before it counts as abandoned), a frozen state, and a final
        version's keep-alive key, whose lease is granted up to 2 s longer than its TTL (1 s of
        margin, then whole seconds). Restarted nodes may arrive `RESTART_DELAY` late, members
        notice waiting nodes within a monitor interval, and a version opened just before the
        faults stopped may need all of this twice (it fails once, its successor forms).
        """
        ttls = self.ttls
        held = ttls.setup + self.last_call + ttls.joinable + ttls.frozen + ttls.keep_alive + 8
        return RESTART_DELAY[1] + 2 * (held + MONITOR_INTERVAL)

    def describe(self) -> str:
        faults = (
            f"until t={self.faults_until:.1f}: crash rate {self.crash_rate}, {self.pauses} "
            f"pauses, {self.outages} outages, {self.lost_answers} lost answers, "
            f"{self.lease_expiries} lease expiries, {self.worker_failures} worker failures"
        )
        return (
            f"seed {self.seed}: {self.nodes} nodes ({self.late_joiners} late), --nnodes "
            f"{self.min_nodes}:{self.max_nodes}, {self.layout} layout, last call "
            f"{self.last_call}s, keep-alive TTL {self.ttls.keep_alive}s, starts within "
            f"{self.start_spread}s, {self.stragglers} as the last call ends; faults {faults}"
            + ("; one misconfigured node" if self.mismatch else "")
            + (f"; {self.rank_policy.describe()}" if self.rank_policy.decided_at_freeze else "")
        )


# Where a node can be killed, as the observer sees it: (phase, "enter" or "exit").
DIE_AT = {
    "setup": (Phase.SETUP, "exit"),  # it may hold the placeholder that opens the next version
    "join": (Phase.JOIN, "exit"),  # it holds a rank of a joinable version
    "last_call": (Phase.LAST_CALL, "enter"),  # it holds the last call
    "frozen": (Phase.FROZEN_WAIT, "exit"),  # frozen, not confirmed yet
    "confirm": (Phase.CONFIRM, "exit"),  # confirmed, the version not final yet
    "final": (Phase.RENDEZVOUS, "exit"),  # a member of a final version
}


class _NodeObserver(Observer):
    """What the checker hears from a node: the version it takes part in, and, with a
    `die_at` point, the moment the first node to reach it is killed there."""

    def __init__(self, run: Run, name: str) -> None:
        self._run, self._name = run, name
        point = run.scenario.die_at
        self._die_at = None if point is None else DIE_AT[point]

    @contextmanager
    def phase(self, phase: Phase, **attributes: object) -> Iterator[PhaseScope]:
        version = attributes.get("version")
        if isinstance(version, int):
            self._run.taking_part[self._name] = version
        rank = attributes.get("rank")
        self._strike(phase, "enter", rank)
        with NOOP_OBSERVER.phase(phase) as scope:
            yield scope
            # A phase learns its rank on the way (a join): the scope's, else the caller's.
        self._strike(phase, "exit", rank)

    def _strike(self, phase: Phase, when: str, rank: object = None) -> None:
        if self._die_at == (phase, when) and self._run.crashed_at is None:
            self._run.victim_rank = rank if isinstance(rank, int) else None
            self._run.crash_now(self._name)

    def version_torn_down(
        self, version: int, reason: str, ranks: Sequence[int], nodes: Sequence[str]
    ) -> None:
        self._run.torn_down.append((version, reason, tuple(ranks)))


@dataclass
class Outcome:
    scenario: Scenario
    violations: list[str]
    trace: list[str]
    steps: int
    virtual_seconds: float
    final_at: float | None  # when the liveness goal was met
    crashed_at: float | None = None  # when the `die_at` victim was killed
    victim_rank: int | None = None  # its rank, where it had one
    # (version, reason, ranks) of every version a node tore down, as it told its observer
    torn_down: list[tuple[int, str, tuple[int, ...]]] = field(default_factory=list)
    policy_checks: int = 0  # memberships checked against the rank policy's promise
    kept_by_stable: int = 0  # of which the stable policy had to keep a rank

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        lines = [self.scenario.describe()]
        lines += [f"VIOLATION: {violation}" for violation in self.violations]
        lines.append(f"after {self.steps} steps, t={self.virtual_seconds:.3f}; last steps:")
        lines += self.trace[-80:]
        policies = " RANK_POLICIES=1" if self.scenario.rank_policy.decided_at_freeze else ""
        lines.append(f"replay: make simulate SEEDS={self.scenario.seed}{policies}")
        return "\n".join(lines)


@dataclass
class _Version:
    world_size: int
    ranks: dict[int, str] = field(default_factory=dict)


class Run:
    """One schedule: its simulation, its nodes, and the checker that watches both."""

    def __init__(self, scenario: Scenario, max_steps: int | None = None) -> None:
        self.scenario = scenario
        self.sim = Simulation(scenario.seed)
        self.rng = random.Random(scenario.seed ^ 0x5EED)
        self.paths = RunPaths(f"{PREFIX}/run_{RUN_ID}")
        self.violations: list[str] = []
        # Generous: a livelock shows as a step count far past any of these. Under torch's
        # layout N nodes lose O(N) compare-and-swaps each under a random schedule.
        contended = 8 * scenario.nodes**2 if scenario.layout == "torch" else 0
        budget = 40_000 + 400 * scenario.nodes + contended
        # A misconfigured node can keep a run churning until the schedule's end: more steps.
        self.max_steps = max_steps or budget * (4 if scenario.mismatch else 1)
        # node -> its live incarnation (a process), or absent while dead or exited for good
        self.incarnations: dict[str, int] = {}
        self.training: dict[str, Membership] = {}
        self.wants_restart: set[str] = set()
        self.exited: dict[str, str] = {}
        self.versions: dict[int, _Version] = {}
        self.opened: int = 0
        self.final_at: float | None = None
        self.sim.on_change = self._on_change
        self._incarnation = 0
        self.crashed_at: float | None = None
        self.taking_part: dict[str, int] = {}  # node -> the version it last took part in
        self.broken_versions: set[int] = set()  # versions a node died in
        self.victim: str | None = None  # the `die_at` victim
        self.victim_rank: int | None = None  # its rank, where it had one
        self.torn_down: list[tuple[int, str, tuple[int, ...]]] = []  # as the nodes reported
        self._decoded: tuple[int, RendezvousState] | None = None
        self.sim.on_pick = self._maybe_crash
        self.policy_checks = 0  # memberships checked against the rank policy's promise
        self.kept_by_stable = 0  # of which the stable policy had to keep a rank

    # --- the schedule ----------------------------------------------------------------------------

    def execute(self) -> Outcome:
        s = self.scenario
        names = [f"n{i:04d}" for i in range(s.nodes)]
        for index, name in enumerate(names):
            late = index >= s.nodes - s.late_joiners
            if index < s.stragglers:
                start = s.last_call + self.rng.uniform(-0.005, 0.02)
            else:
                start = s.faults_until + self.rng.uniform(0, 5) if late else 0.0
                start += self.rng.uniform(0, 0.0 if s.stragglers else s.start_spread)
            self.sim.at(start, f"start {name}", self._starter(name))
        if s.mismatch:
            self.sim.at(self.rng.uniform(0, 20), "start misconfigured node", self._starter("bad"))
        self._schedule_faults(names)
        self.sim.at(s.faults_until, "faults stop; crashed nodes restart", self._faults_stop)
        deadline = s.faults_until + s.bound + max(s.start_spread, 5.0) + 10.0
        try:
            while self.sim.steps < self.max_steps and not self.violations:
                if not self.sim.run_step():
                    self._violation("nothing can run any more, and no final version formed")
                    break
                if self._goal_met():
                    break
                if self.sim.errors:
                    self._violation(f"exception escaped a node: {self.sim.errors[0]}")
                if self.sim.now > deadline:
                    self._violation(
                        f"liveness: no final version of live nodes {s.bound:.0f}s after the "
                        f"faults stopped (t={self.sim.now:.1f}); {self._where()}"
                    )
            else:
                if not self.violations:
                    self._violation(
                        f"no final version within {self.max_steps} steps; {self._where()}"
                    )
        finally:
            self.sim.drain()
        return Outcome(
            s,
            self.violations,
            list(self.sim.trace),
            self.sim.steps,
            self.sim.now,
            self.final_at,
            self.crashed_at,
            self._victim_rank(),
            self.torn_down,
            self.policy_checks,
            self.kept_by_stable,
        )

    def _schedule_faults(self, names: list[str]) -> None:
        s, rng, sim = self.scenario, self.rng, self.sim

        def when() -> float:
            return rng.uniform(0, s.faults_until)

        for _ in range(s.pauses):
            name = rng.choice(names)
            length = rng.uniform(s.ttls.keep_alive, 3 * s.ttls.keep_alive)
            at = when()
            until = min(at + length, s.faults_until)
            sim.at(at, f"pause {name} until t={until:.1f}", self._pause(name, until))
        for _ in range(s.outages):
            length = rng.uniform(0.5, 2 * s.ttls.keep_alive)
            at = when()
            sim.at(at, f"etcd stops answering for {length:.1f}s", self._outage(True))
            sim.at(min(at + length, s.faults_until), "etcd answers again", self._outage(False))
        for _ in range(s.lost_answers):
            applied = rng.random() < 0.5
            what = "applied" if applied else "not applied"
            sim.at(
                when(), f"the next conditional write's answer is lost ({what})", self._lose(applied)
            )
        for _ in range(s.lease_expiries):
            sim.at(when(), "a keep-alive lease expires early", self._expire_a_lease)
        for _ in range(s.worker_failures):
            sim.at(when(), "a worker fails", self._fail_a_worker)

    # --- nodes -----------------------------------------------------------------------------------

    def _starter(self, name: str) -> Callable[[], None]:
        return lambda: self._start(name)

    def _start(self, name: str) -> None:
        if name in self.incarnations:
            return
        self._incarnation += 1
        incarnation = self._incarnation
        self.incarnations[name] = incarnation
        self.exited.pop(name, None)
        self.sim.spawn(name, f"{name}.{incarnation}", lambda: self._agent(name, incarnation))

    def _agent(self, name: str, incarnation: int) -> None:
        s = self.scenario
        nodes = (s.min_nodes, s.max_nodes)
        if name == "bad":
            nodes = (s.max_nodes + 1, s.max_nodes + 2)
        config = RendezvousConfig(
            RUN_ID,
            parse_endpoints("simulated:2379"),
            *nodes,
            timeout=100_000.0,
            last_call_timeout=s.last_call,
            ttls=s.ttls,
            etcd_api="v3" if s.layout == "claims" else "v2",
            rank_policy=s.rank_policy,
            # A node is the same node across its incarnations (restarts of its process).
            node_id=name,
        )
        runtime = SimulatedRuntime(self.sim, name)
        kv = SimulatedKeyValue(self.sim, name, claims=s.layout == "claims")
        observer = _NodeObserver(self, name)
        node = EtcdRendezvous(
            kv, config, observer, runtime=runtime, claimant=f"{name}.{incarnation}"
        )
        try:
            node.prepare()
        except EtcdUnavailableError:
            self._exit(name, "etcd did not answer at start", restart=True)
            return
        while True:
            try:
                membership = node.next_rendezvous()
            except (ConfigurationError, RendezvousTimeoutError, RendezvousClosedError) as error:
                # With a misconfigured node, whichever --nnodes opened a version wins: the
                # others get a ConfigurationError that says so, which is the behaviour wanted.
                if not (s.mismatch and isinstance(error, ConfigurationError)):
                    self._violation(f"{name} failed: {type(error).__name__}: {error}")
                self._exit(name, type(error).__name__, restart=False)
                return
            self._joined(name, incarnation, membership)
            while True:
                runtime.sleep(MONITOR_INTERVAL)
                if name in self.wants_restart:
                    self.wants_restart.discard(name)
                    break
                try:
                    state = node.current_state()
                except (KvError, EtcdRdzvError):
                    continue  # as the handler: an unanswered call is 0 nodes waiting
                if protocol.nodes_waiting(state, membership.version) > 0:
                    break
            self.training.pop(name, None)

    def _exit(self, name: str, why: str, *, restart: bool) -> None:
        self.incarnations.pop(name, None)
        self.training.pop(name, None)
        self.exited[name] = why
        # A member's death fails the others' collectives: their agents restart the workers,
        # now or as soon as they start training in its version.
        version = self.taking_part.pop(name, None)
        if version is not None:
            self.broken_versions.add(version)
        for other, membership in sorted(self.training.items()):
            if membership.version == version:
                self.wants_restart.add(other)
        if restart:
            delay = self.rng.uniform(*RESTART_DELAY)
            self.sim.at(self.sim.now + delay, f"restart {name}", self._starter(name))

    def _maybe_crash(self, actor: Actor) -> None:
        s = self.scenario
        if self.sim.now >= s.faults_until or actor.killed or actor.node not in self.incarnations:
            return
        if self.rng.random() < s.crash_rate:
            self._crash(actor.node)

    def _crash(self, name: str) -> None:
        self.sim.note("scheduler", f"crash {name}")
        self.sim.kill(name)
        self._exit(name, "crashed", restart=True)

    def _victim_rank(self) -> int | None:
        if self.victim_rank is not None or self.victim is None:
            return self.victim_rank
        held = [
            rank
            for record in self.versions.values()
            for rank, holder in record.ranks.items()
            if holder.startswith(f"{self.victim}.")
        ]
        return held[-1] if held else None

    def crash_now(self, name: str) -> None:
        """Kill `name` where it runs (it unwinds at its next step); it stays dead."""
        self.victim = name
        self.sim.note("checker", f"kill {name} at {self.scenario.die_at}")
        self.crashed_at = self.sim.now
        self.sim.kill(name)
        self._exit(name, "killed", restart=False)

    def _faults_stop(self) -> None:
        self.sim.etcd.faults.unavailable = False
        self.sim.etcd.faults.lose_next_answers.clear()

    def _pause(self, name: str, until: float) -> Callable[[], None]:
        return lambda: self.sim.pause(name, until)

    def _lose(self, applied: bool) -> Callable[[], None]:
        return lambda: self.sim.etcd.faults.lose_next_answers.append(applied)

    def _outage(self, on: bool) -> Callable[[], None]:
        def switch() -> None:
            self.sim.etcd.faults.unavailable = on

        return switch

    def _expire_a_lease(self) -> None:
        keys = sorted(k for k in self.sim.etcd.keys(self.paths.rdzv) if "/rank_" in k)
        if keys:
            self.sim.etcd.expire_lease_of(self.rng.choice(keys))

    def _fail_a_worker(self) -> None:
        if self.training:
            self.wants_restart.add(self.rng.choice(sorted(self.training)))

    # --- invariants ------------------------------------------------------------------------------

    def _violation(self, what: str) -> None:
        self.sim.note("checker", f"VIOLATION {what}")
        self.violations.append(what)

    def _state(self) -> RendezvousState | None:
        """The state document now, read from the store without a request (not a step)."""
        entry = self.sim.etcd._entry(self.paths.active_version)
        if entry is None:
            return None
        if self._decoded is None or self._decoded[0] != entry.revision:
            self._decoded = (entry.revision, RendezvousState.decode(entry.value, entry.key))
        return self._decoded[1]

    def _joined(self, name: str, incarnation: int, membership: Membership) -> None:
        version, rank, size = membership.version, membership.rank, membership.world_size
        self.sim.note(f"{name}.{incarnation}", f"joined version {version}: rank {rank} of {size}")
        state = self._state()
        if state is None or not state.is_version(Status.FINAL, version) or state.world_size != size:
            self._violation(
                f"{name} got rank {rank} of version {version} ({size} nodes) while etcd holds "
                f"{'no state' if state is None else f'{state.status.value} {state.version}'}"
            )
        record = self.versions.setdefault(version, _Version(size))
        if record.world_size != size:
            self._violation(
                f"version {version}: world size {size} for {name}, {record.world_size} before"
            )
        if not 0 <= rank < size:
            self._violation(f"{name} got rank {rank} of a version of {size}")
        holder = record.ranks.get(rank)
        me = f"{name}.{incarnation}"
        if holder is not None and holder != me:
            self._violation(f"rank {rank} of version {version} handed to {holder} and {me}")
        record.ranks[rank] = me
        self._check_rank_policy(name, membership, state)
        if self.incarnations.get(name) != incarnation:
            return  # killed on its way out of the rendezvous: it never trains
        self.training[name] = membership
        if version in self.broken_versions:
            self.wants_restart.add(name)

    def _check_rank_policy(
        self, name: str, membership: Membership, state: RendezvousState | None
    ) -> None:
        """The policy's promise, against what this checker saw: a node of the previous final
        version keeps its rank unless the world shrank below it, rank0_node is rank 0, and
        the previous rank a node is told is the one it held."""
        policy = self.scenario.rank_policy
        if not policy.decided_at_freeze or state is None:
            return
        decided = protocol.decided_ranks(state)
        if not isinstance(decided, Assignment):
            self._violation(f"final version {state.version} under {policy.spec} ranks nobody")
            return
        rank, size = membership.rank, membership.world_size
        if policy.rank0_node == name and rank != 0:
            self._violation(f"{name} is rank0_node but got rank {rank} of {membership.version}")
        before = self.versions.get(decided.previous_version or -1)
        if before is None or len(before.ranks) != before.world_size:
            return  # a member of it died on its way out: the checker does not know its ranks
        held = next((r for r, who in before.ranks.items() if who.partition(".")[0] == name), None)
        self.policy_checks += 1
        if membership.previous_rank != held:
            self._violation(
                f"{name} told previous rank {membership.previous_rank} in version "
                f"{membership.version}, held {held} in version {decided.previous_version}"
            )
        moved = policy.rank0_node is not None and 0 in (rank, held)
        if policy.kind == "stable" and held is not None and held < size and not moved:
            self.kept_by_stable += 1
            if rank != held:
                self._violation(
                    f"{name} held rank {held} of version {decided.previous_version} and got "
                    f"{rank} of version {membership.version} ({size} nodes)"
                )

    def _on_change(self, change: Change) -> None:
        run = self.paths.run
        if change.key != run and not change.key.startswith(run + "/"):
            self._violation(f"key written outside the run: {change.key}")
        if change.key != self.paths.active_version:
            return
        if change.value is None:
            self.sim.note("etcd", "state deleted")
            return
        try:
            state = RendezvousState.decode(change.value, change.key)
        except CorruptStateError as error:
            self._violation(f"state document does not decode: {error}")
            return
        self.sim.note(
            "etcd",
            f"state {state.status.value} {state.version} with {state.world_size}"
            + (f", {len(state.keep_alives)} confirmed" if state.keep_alives else "")
            + (f", {state.num_workers_waiting} waiting" if state.num_workers_waiting else ""),
        )
        if state.version is not None and state.status is Status.JOINABLE:
            if state.version < self.opened:
                self._violation(f"version {state.version} opened after version {self.opened}")
            self.opened = max(self.opened, state.version)
        if state.status is Status.FINAL and state.version is not None:
            # In confirmation order under torch's layout: a set, each rank's key once.
            expected = {self.paths.keep_alive(state.version, r) for r in range(state.world_size)}
            listed = state.keep_alives or ()
            if set(listed) != expected or len(listed) != len(expected):
                self._violation(f"final version {state.version} lists {listed}")

    # --- liveness --------------------------------------------------------------------------------

    def _goal_met(self) -> bool:
        """Liveness, as the protocol promises it: after the faults stopped, a final version
        forms whose members all live and hold their ranks, with at least min_nodes of them.

        Not that every live node is in it: a node that arrives after a version froze waits
        for the next, and if the last call is shorter than it takes all nodes to join, each
        new version may again freeze without the slowest (torch's protocol does the same).
        """
        s = self.scenario
        if s.mismatch:  # a misconfigured run need not form: safety and no crash only
            return self.sim.now >= s.faults_until + s.bound
        if self.sim.now < s.faults_until:
            return False
        state = self._state()
        if state is None or state.status is not Status.FINAL or state.version is None:
            return False
        record = self.versions.get(state.version)
        if record is None or len(record.ranks) != state.world_size:
            return False
        for holder in record.ranks.values():
            name, _, incarnation = holder.partition(".")
            if self.incarnations.get(name) != int(incarnation):
                return False
        if state.world_size < s.min_nodes:
            return False
        self.final_at = self.sim.now
        self.sim.note("checker", f"final version {state.version} of {state.world_size}: goal met")
        return True

    def _where(self) -> str:
        state = self._state()
        shown = (
            "no state"
            if state is None
            else f"{state.status.value} {state.version} with {state.world_size}"
        )
        live, training = sorted(self.incarnations), sorted(self.training)
        return (
            f"etcd holds {shown}; {len(live)} live nodes ({_few(live)}), {len(training)} "
            f"training ({_few(training)})"
        )


def _few(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def run(seed: int, *, nodes: int | None = None, rank_policies: bool = False) -> Outcome:
    return Run(Scenario.from_seed(seed, nodes=nodes, rank_policies=rank_policies)).execute()
