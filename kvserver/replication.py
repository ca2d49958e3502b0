"""Primary-backup replication of one tablet, as a pure state machine.

No sockets, threads or clocks here (STYLE.md, after TinyKV's raft core): the
glue in `kvserver/cluster.py` feeds in messages and events and carries out
the actions that come back. That keeps every rule below testable with
messages dropped, delayed and reordered, without a single sleep.

One `TabletReplica` per tablet per server. Its roles:

    NONE    --set_view(primary=me)----------------------------> PRIMARY
    NONE    --set_view(primary=other, me among its replicas)--> REPLICA
    REPLICA --set_view(primary=me)----------------------------> PRIMARY
    PRIMARY --set_view(newer epoch, primary=other)------------> REPLICA
    PRIMARY --Append/Snapshot of a newer epoch (_adopt)-------> REPLICA
              (deposed before the master's view arrives, story 8 of
              docs/replication.md; its pending writes come out of take_aborted)
    any     --set_view(me not among its replicas)-------------> NONE

A replica that is in the master's view is a *member* (it holds every
acknowledged write); one that is not is *recovering*. Both receive the
primary's stream the same way; the difference is only whether the primary
waits for their acknowledgements (members) or not (recovering ones), and
whether the master may elect them.

The log: every record is `(seq, epoch, effect)`; seq grows by one per record
in the tablet, epoch is the view epoch under which the primary created it.
One primary per epoch, and every replica's log is, since its last sync, a
prefix of its primary's log (the `prev` check below, as in Raft's
AppendEntries), so two logs that hold the same (seq, epoch) are identical up
to there.

Rules (docs/replication.md tells them as stories):

1. Epochs only go up. A replica refuses (`Stale`) a message from an epoch
   older than the one it knows; a newer epoch in a message is adopted (only
   the primary of that epoch can send it).
2. `Append(prev_seq, prev_epoch, records)` is accepted only if the replica's
   log ends exactly at (prev_seq, prev_epoch); then the records are made
   durable, and only then `Ack(seq)` is sent. Otherwise the replica answers
   `Gap(last_seq, last_epoch)` and the primary re-syncs it: the records after
   its last one if the primary's record there has the same epoch, else a
   whole snapshot (a divergent, never-acknowledged tail is thereby dropped).
3. The primary commits seq s when s is durable in its own log and every
   member of the view it knows (plus replicas it is asking to admit) has
   acknowledged s. Only then is the write applied and acknowledged.
4. A primary whose member stops answering asks the master to remove it (a new
   epoch); a recovering replica whose acknowledged seq reaches the commit
   point is proposed for admission, and from that moment the primary counts
   it for commits, so that it holds every acknowledged write when the master
   adds it to the view.
5. A new primary serves only once every member has acknowledged its whole
   log (`ready`): what it holds from the old epoch may not be on every member
   yet, and a read must never return a write that a later failover could lose.
6. A primary that learns of a newer epoch where it is not primary aborts its
   pending writes (outcome unknown to their clients) and becomes a replica.
7. Hand-over (a planned change of primary, to give a restarted server its
   tablets back): a primary that `begin_handover(target)` takes no new
   writes, lets what is in flight commit, and once nothing is pending (so
   the target, a member, holds its whole log) asks the master to make the
   target primary (`AskHandover`). A refusal, no answer, or no drain within
   HANDOVER_TICKS ticks ends the hand-over and writes go on. Nothing is
   aborted: the new view arrives with nothing pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# -- records and views ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One log record; `effect` is opaque here (the storage engine's effect)."""

    seq: int
    epoch: int
    effect: object = None


@dataclass(frozen=True)
class View:
    """The master's word on one tablet (master/placement.py makes these)."""

    tablet: int
    epoch: int
    primary: str | None
    members: tuple[str, ...]        # the view: holds every acknowledged write
    replicas: tuple[str, ...]       # every server assigned to the tablet


# -- messages between primary and replicas ---------------------------------------


@dataclass(frozen=True)
class Append:
    """Primary -> replica: records following (prev_seq, prev_epoch). Empty = a probe."""

    tablet: int
    epoch: int
    prev_seq: int
    prev_epoch: int
    records: tuple[Record, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """Primary -> replica: the whole tablet as of (seq, seq_epoch); `data` is opaque."""

    tablet: int
    epoch: int
    seq: int
    seq_epoch: int
    data: object = None


@dataclass(frozen=True)
class Ack:
    """Replica -> primary: my log is yours up to `seq`, durably. `epoch`: the request's."""

    tablet: int
    epoch: int
    seq: int


@dataclass(frozen=True)
class Gap:
    """Replica -> primary: my log does not end at your prev; it ends at (last_seq, last_epoch)."""

    tablet: int
    epoch: int
    last_seq: int
    last_epoch: int


@dataclass(frozen=True)
class Stale:
    """Replica -> primary: your epoch is older than mine (`epoch`)."""

    tablet: int
    epoch: int


Reply = Ack | Gap | Stale

# -- actions for the glue -------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send `msg` to `peer` on the ordered stream to it."""

    peer: str
    msg: Append | Snapshot


@dataclass(frozen=True)
class Committed:
    """Every record with seq <= `seq` is committed: apply and acknowledge them."""

    seq: int


@dataclass(frozen=True)
class Aborted:
    """Pending records whose fate is unknown (the primary was deposed)."""

    seqs: tuple[int, ...]


@dataclass(frozen=True)
class CatchUp:
    """Re-sync `peer`, whose log ends at (after_seq, after_epoch): send it the
    records after that if this log holds the same record there, else a
    snapshot; then call `caught_up`."""

    peer: str
    after_seq: int
    after_epoch: int | None          # None: known to be a prefix of this log


@dataclass(frozen=True)
class AskRemove:
    """Ask the master to drop `peer` from the view of `epoch` (it stopped answering)."""

    peer: str
    epoch: int


@dataclass(frozen=True)
class AskAdmit:
    """Ask the master to add `peer` to the view of `epoch` (it is current)."""

    peer: str
    epoch: int


@dataclass(frozen=True)
class AskHandover:
    """Ask the master to make `peer` primary of the view of `epoch` (this
    primary has drained: `peer`, a member, holds its whole log)."""

    peer: str
    epoch: int


@dataclass(frozen=True)
class RefreshView:
    """A peer knows a newer epoch: ask the master for the current view now."""


Action = Send | Committed | Aborted | CatchUp | AskRemove | AskAdmit | AskHandover | RefreshView

# -- errors ---------------------------------------------------------------------


class NotPrimary(Exception):
    """propose() on a replica that is not (or no longer) primary."""


class NotReady(Exception):
    """propose() on a primary whose members have not yet all got its log."""


# -- the state machine ----------------------------------------------------------

NONE, PRIMARY, REPLICA = "none", "primary", "replica"

PROBE_TICKS = 3          # ticks without an acknowledgement before a lagging peer is probed again
HANDOVER_TICKS = 5       # ticks a hand-over may take to drain before writes go on again

# Peer stream states, primary side.
# CONNECTING: no stream yet (the glue is connecting); DOWN: the stream broke.
CONNECTING, DOWN, PROBING, CATCHING_UP, STREAMING = "connecting", "down", "probing", "catching_up", "streaming"


@dataclass
class Peer:
    state: str = CONNECTING
    match: int = 0                   # highest seq it has acknowledged in this epoch
    asked_remove: bool = False
    idle_ticks: int = 0              # ticks since it last acknowledged anything while behind


@dataclass
class TabletReplica:
    """Replication state of one tablet on server `me`.

    `last_seq`/`last_epoch` describe this server's own log (durable or being
    made durable: a primary counts a record from `propose`, its durability
    from `local_durable`).
    """

    tablet: int
    me: str
    last_seq: int = 0
    last_epoch: int = 0
    epoch: int = 0
    role: str = NONE
    view: View | None = None
    durable: int = 0                       # primary: highest seq durable in its own log
    commit: int = 0                        # primary: highest committed seq
    promote_seq: int = 0                   # primary: its last seq when it was named primary
    peers: dict[str, Peer] = field(default_factory=dict)
    admitting: set = field(default_factory=set)
    pending: dict[int, Record] = field(default_factory=dict)   # primary: seq -> uncommitted record
    orphans: list = field(default_factory=list)                # aborted by _adopt, for take_aborted
    handing_to: str | None = None          # primary: the member it is handing the tablet to
    handover_asked: bool = False           # ... and the master has been asked
    handover_ticks: int = 0                # ... ticks since it began

    def __post_init__(self):
        self.durable = self.last_seq

    # -- what the server asks ------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY

    @property
    def ready(self) -> bool:
        """A primary may serve once every member holds its whole log from before."""
        return self.role == PRIMARY and self.commit >= self.promote_seq

    @property
    def members(self) -> tuple[str, ...]:
        return self.view.members if self.view else ()

    def quorum(self) -> set[str]:
        """Peers whose acknowledgement a commit needs."""
        return (set(self.members) | self.admitting) - {self.me}

    # -- views from the master -------------------------------------------------

    def set_view(self, view: View) -> list[Action]:
        """The master's current view of this tablet (a heartbeat answer or a
        view-change answer). Older epochs are ignored."""
        if view.epoch < self.epoch or (view.epoch == self.epoch and self.view == view):
            return []
        actions: list[Action] = []
        was_primary = self.role == PRIMARY
        new_epoch = view.epoch != self.epoch
        self.epoch = view.epoch
        self.view = view
        if new_epoch:
            self._end_handover()
        if view.primary == self.me:
            if not was_primary:
                self.role = PRIMARY
                self.promote_seq = self.last_seq
                self.durable = max(self.durable, self.last_seq)
                self.commit = 0
                self.pending.clear()
                self.peers = {}
            self.admitting = {p for p in self.admitting if p not in view.members} if not new_epoch else set()
            wanted = set(view.replicas) - {self.me}
            for p in list(self.peers):
                if p not in wanted:
                    del self.peers[p]
            for p in wanted:
                peer = self.peers.setdefault(p, Peer())
                if new_epoch:
                    # Acks are counted per epoch: probe again so every peer
                    # re-states where its log ends under the new epoch.
                    peer.match = 0
                    peer.asked_remove = False
                    if peer.state not in (DOWN, CONNECTING):
                        peer.state = PROBING
                        actions.append(Send(p, self._probe()))
            actions += self._advance()
        else:
            if self.pending:
                aborted = tuple(sorted(self.pending))
                self.pending.clear()
                actions.append(Aborted(aborted))
            self.role = REPLICA if self.me in view.replicas else NONE
            self.peers = {}
            self.admitting = set()
        return actions

    # -- primary side ------------------------------------------------------------

    def _probe(self) -> Append:
        return Append(self.tablet, self.epoch, self.last_seq, self.last_epoch, ())

    def propose(self, effect: object) -> tuple[Record, list[Action]]:
        """Give `effect` the next seq; the glue logs it locally (then calls
        `local_durable`) and sends the returned messages."""
        if self.role != PRIMARY:
            raise NotPrimary(f"tablet {self.tablet}: not primary")
        if not self.ready:
            raise NotReady(f"tablet {self.tablet}: new primary still syncing its members")
        if self.handing_to is not None:
            raise NotReady(f"tablet {self.tablet}: handing over to {self.handing_to}")
        rec = Record(self.last_seq + 1, self.epoch, effect)
        prev_seq, prev_epoch = self.last_seq, self.last_epoch
        self.last_seq, self.last_epoch = rec.seq, rec.epoch
        self.pending[rec.seq] = rec
        msg = Append(self.tablet, self.epoch, prev_seq, prev_epoch, (rec,))
        return rec, [Send(p, msg) for p, peer in self.peers.items() if peer.state == STREAMING]

    def begin_handover(self, target: str) -> list[Action]:
        """Hand this tablet to `target`, a member: take no new writes, and ask
        the master once what is in flight has committed (rule 7)."""
        if (self.role != PRIMARY or not self.ready or self.handing_to is not None
                or target == self.me or target not in self.members):
            return []
        self.handing_to, self.handover_asked, self.handover_ticks = target, False, 0
        return self._advance()

    def handover_refused(self) -> list[Action]:
        """The master refused the hand-over, or did not answer: serve on (a
        new view, if the master did change it after all, deposes us then)."""
        self._end_handover()
        return [RefreshView()]

    def _end_handover(self) -> None:
        self.handing_to, self.handover_asked, self.handover_ticks = None, False, 0

    def local_durable(self, seq: int) -> list[Action]:
        """Records up to `seq` are durable in this server's own log."""
        if seq > self.durable:
            self.durable = seq
        return self._advance() if self.role == PRIMARY else []

    def peer_up(self, peer: str) -> list[Action]:
        """A stream to `peer` is (re)connected: probe where its log ends."""
        p = self.peers.get(peer)
        if self.role != PRIMARY or p is None:
            return []
        p.state = PROBING
        return [Send(peer, self._probe())]

    def peer_down(self, peer: str) -> list[Action]:
        """The stream to `peer` broke (or never connected). A member that
        cannot acknowledge blocks commits: ask the master to remove it."""
        p = self.peers.get(peer)
        if self.role != PRIMARY or p is None:
            return []
        p.state = DOWN
        return self._maybe_remove(peer)

    def _maybe_remove(self, peer: str) -> list[Action]:
        p = self.peers[peer]
        if peer in self.admitting and peer not in self.members:
            # Its ADMIT is on its way: the master may add it to the view
            # any moment (it heard from it lately). It keeps counting for
            # commits until the answer, or a newer view, settles it.
            return []
        if peer in self.quorum() and not p.asked_remove:
            p.asked_remove = True
            return [AskRemove(peer, self.epoch)]
        return []

    def remove_refused(self, peer: str) -> list[Action]:
        """The master refused to remove `peer` (our epoch was stale): try again after the next view."""
        p = self.peers.get(peer)
        if p is not None:
            p.asked_remove = False
        return [RefreshView()]

    def admit_refused(self, peer: str, epoch: int, current_epoch: int | None) -> list[Action]:
        """The master refused `AskAdmit(peer, epoch)`, saying the tablet's view
        is now `current_epoch`; or it did not answer (`current_epoch` None:
        the outcome is unknown). Only a refusal in an unchanged view proves
        `peer` was not added: then it stops counting for commits. Otherwise
        the view may already hold it as a member: it keeps counting until a
        newer view resets the admissions, and the question is asked again
        (an ADMIT already applied is then refused with a newer epoch)."""
        if peer not in self.admitting or epoch != self.epoch or self.role != PRIMARY:
            return []
        if current_epoch is not None and current_epoch <= self.epoch:
            self.admitting.discard(peer)
            return self._advance()
        if current_epoch is None:
            return [RefreshView(), AskAdmit(peer, self.epoch)]
        return [RefreshView()]

    def on_reply(self, peer: str, reply: Reply) -> list[Action]:
        """A replica's answer to an Append or Snapshot."""
        p = self.peers.get(peer)
        if self.role != PRIMARY or p is None:
            return []
        if isinstance(reply, Stale):
            if reply.epoch > self.epoch:
                p.state = PROBING
                return [RefreshView()]
            return []
        if reply.epoch != self.epoch:
            return []                    # an answer from an older epoch: counted anew by the probe
        if isinstance(reply, Gap):
            if p.state == CATCHING_UP:
                return []                # a late answer to something sent before the re-sync
            p.state = CATCHING_UP
            return [CatchUp(peer, reply.last_seq, reply.last_epoch)]
        # Ack
        if reply.seq > self.last_seq:
            return []                    # cannot be: not from this log
        if reply.seq > p.match:
            p.match = reply.seq
            p.idle_ticks = 0
        if p.state == PROBING:
            if reply.seq == self.last_seq:
                p.state = STREAMING
            else:
                # It holds a prefix of this log: send what it lacks.
                p.state = CATCHING_UP
                return [CatchUp(peer, reply.seq, self._epoch_at(reply.seq))] + self._advance()
        return self._advance()

    def _epoch_at(self, seq: int) -> int | None:
        rec = self.pending.get(seq)
        if rec is not None:
            return rec.epoch
        if seq == self.last_seq:
            return self.last_epoch
        return None                      # an Ack: its log is a prefix of this one, no check needed

    def tick(self) -> list[Action]:
        """A logical clock tick (the glue ticks a few times a second). A peer
        that is behind and has acknowledged nothing for PROBE_TICKS ticks is
        probed again: a message was lost, or a re-sync answer was dropped."""
        if self.role != PRIMARY:
            return []
        actions: list[Action] = []
        if self.handing_to is not None and not self.handover_asked:
            self.handover_ticks += 1
            if self.handover_ticks >= HANDOVER_TICKS:
                self._end_handover()          # did not drain in time: serve on
        for name, p in self.peers.items():
            if p.state in (DOWN, CONNECTING) or p.match >= self.last_seq:
                p.idle_ticks = 0
                continue
            p.idle_ticks += 1
            if p.idle_ticks >= PROBE_TICKS:
                p.idle_ticks = 0
                p.state = PROBING
                actions.append(Send(name, self._probe()))
        return actions

    def caught_up(self, peer: str, upto_seq: int, upto_epoch: int) -> list[Action]:
        """The glue sent `peer` everything up to (upto_seq, upto_epoch) from
        the local log (or a snapshot). Send the rest from memory and stream,
        or, if records between are no longer in memory, catch up again."""
        p = self.peers.get(peer)
        if self.role != PRIMARY or p is None or p.state != CATCHING_UP:
            return []
        if upto_seq >= self.last_seq:
            p.state = STREAMING
            return []
        missing = [self.pending.get(s) for s in range(upto_seq + 1, self.last_seq + 1)]
        if any(r is None for r in missing):
            return [CatchUp(peer, upto_seq, upto_epoch)]
        p.state = STREAMING
        return [Send(peer, Append(self.tablet, self.epoch, upto_seq, upto_epoch, tuple(missing)))]

    def _advance(self) -> list[Action]:
        """Move the commit point; propose admissions."""
        actions: list[Action] = []
        q = self.quorum()
        commit = self.durable
        for name in q:
            p = self.peers.get(name)
            commit = min(commit, p.match if p else 0)
        if commit > self.commit:
            self.commit = commit
            for s in [s for s in self.pending if s <= commit]:
                del self.pending[s]
            actions.append(Committed(commit))
        if self.ready:
            for name, p in self.peers.items():
                if (name not in self.members and name not in self.admitting and p.state == STREAMING
                        and p.match >= self.commit and p.match == self.last_seq):
                    self.admitting.add(name)
                    actions.append(AskAdmit(name, self.epoch))
        if (self.handing_to is not None and not self.handover_asked and not self.pending
                and self.commit == self.last_seq and self.handing_to in self.members):
            self.handover_asked = True
            actions.append(AskHandover(self.handing_to, self.epoch))
        for name in q:
            p = self.peers.get(name)
            if p is not None and p.state == DOWN:
                actions += self._maybe_remove(name)
        return actions

    # -- replica side --------------------------------------------------------------

    def on_append(self, msg: Append) -> tuple[tuple[Record, ...], Reply]:
        """An Append from a primary. Returns (records to make durable and
        apply, in order, BEFORE sending the reply; the reply)."""
        if msg.epoch < self.epoch:
            return (), Stale(self.tablet, self.epoch)
        if self.role == PRIMARY and msg.epoch == self.epoch:
            return (), Stale(self.tablet, self.epoch)   # two primaries in one epoch cannot be
        if msg.epoch > self.epoch:
            self._adopt(msg.epoch)
        recs = msg.records
        if (msg.prev_seq, msg.prev_epoch) != (self.last_seq, self.last_epoch):
            # Overlap (a re-sent or re-synced range): if the message holds
            # our last record itself, our log is its prefix; keep the rest.
            at = self.last_seq - msg.prev_seq - 1
            if not (msg.prev_seq < self.last_seq and at < len(recs)
                    and recs[at].seq == self.last_seq and recs[at].epoch == self.last_epoch):
                return (), Gap(self.tablet, msg.epoch, self.last_seq, self.last_epoch)
            recs = recs[at + 1:]
        expect = self.last_seq + 1
        for r in recs:
            if r.seq != expect:
                return (), Gap(self.tablet, msg.epoch, self.last_seq, self.last_epoch)
            expect += 1
        if recs:
            self.last_seq, self.last_epoch = recs[-1].seq, recs[-1].epoch
            self.durable = self.last_seq
        return recs, Ack(self.tablet, msg.epoch, self.last_seq)

    def on_snapshot(self, msg: Snapshot) -> tuple[bool, Reply]:
        """A Snapshot from a primary: (install it before replying?, the reply)."""
        if msg.epoch < self.epoch or (self.role == PRIMARY and msg.epoch == self.epoch):
            return False, Stale(self.tablet, self.epoch)
        if msg.epoch > self.epoch:
            self._adopt(msg.epoch)
        self.last_seq, self.last_epoch = msg.seq, msg.seq_epoch
        self.durable = self.last_seq
        return True, Ack(self.tablet, msg.epoch, msg.seq)

    def _adopt(self, epoch: int) -> None:
        """A newer epoch seen in a primary's message: only that epoch's primary sends it."""
        if self.role == PRIMARY:
            # Deposed without having heard from the master yet: stop
            # proposing; what is pending is aborted (the glue collects it
            # with take_aborted before it applies the new primary's records).
            self.role = REPLICA
            self.peers = {}
            self.admitting = set()
            self._end_handover()
            if self.pending:
                self.orphans += sorted(self.pending)
                self.pending.clear()
        self.epoch = epoch

    def take_aborted(self) -> list[Action]:
        """Pending records aborted by a newer epoch seen in a message."""
        if not self.orphans:
            return []
        out, self.orphans = [Aborted(tuple(self.orphans))], []
        return out
