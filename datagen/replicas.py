"""Ray actors that may die with their work: which replica gets the next batch, and what
counts as work lost (as opposed to an error the code raised). Used by every actor pool:
the teacher fleet, the filter pool, the streaming dedupe index.

Ray restarts a dead actor (``max_restarts``) and re-runs the tasks it held
(``max_task_retries``), so a killed actor process costs the driver nothing but time.
What does reach the driver is work Ray gave up on: the actor's node vanished
(``ActorUnavailableError`` until the cluster notices, some seconds later), the actor
died more often than its retries allow, or a result was lost with the node that held
it. The driver then runs the batch again under the same row ids, so a row is still
counted once: a teacher's batch as any batch, or alone on one replica if its actor
died on each of Ray's tries (``teachers.fleet.TeacherFleet.lost``: a prompt that kills its engine
must not take other work down with it again); a filter batch at most
``BATCH_MAX_REQUEUES`` times. And it pings the replica that lost it.
The replica gets no work until the ping answers (Ray restarted it, maybe
on another node); while the cluster has not noticed the loss a ping fails fast, and is
sent again a second later; once Ray reports the actor dead for good, it gets no more
work: the driver starts a new actor in its place if it had answered a batch
(``TeacherFleet._renew``). When no replica is left, the run stops.

Not covered: a replica that Ray can never place again (no node has the resources it
asks for) stays "restarting", and its batches wait for another replica, or forever if
it was the only one.
"""

from __future__ import annotations

import time
from typing import Any

from datagen.errors import DatagenError

# Ray restarts a dead actor (teacher, filter) this often in its life, re-running its tasks as often.
ACTOR_MAX_RESTARTS = 3
BATCH_MAX_REQUEUES = 3
REPING_S = 1.0  # a ping that failed fast (the node's loss not yet noticed) is sent again this often


def lost_work_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for work lost with its process, node or object store, as opposed to
    an error the code raised: such work can simply run again."""
    import ray

    e = ray.exceptions
    # OutOfMemoryError: Ray's memory monitor killed the worker to save its node.
    return (e.RayActorError, e.ObjectLostError, e.NodeDiedError, e.WorkerCrashedError, e.OutOfMemoryError)


class ReplicasLost(DatagenError):
    """Every replica died and Ray did not restart them."""


class Liveness:
    """The replicas that lost a batch, each pinged until it answers or is dead for good."""

    def __init__(self) -> None:
        # actor -> (ping method, ref of the ping in flight or None, when it was sent)
        self.down: dict[Any, tuple[Any, Any | None, float]] = {}
        self.dead: set[Any] = set()

    def lost(self, actor: Any, ping: Any) -> None:
        """``ping`` is a cheap actor method (``actor.ready``), called now and again until it answers."""
        if actor not in self.down and actor not in self.dead:
            self.down[actor] = (ping, ping.remote(), time.monotonic())

    def pick(self, actors: list[Any], load: dict[Any, int], limit: int) -> Any | None:
        """The least loaded answering replica with a free slot; None when there is none
        (full, or down). Raises ``ReplicasLost`` when every replica is dead."""
        if not self.down and not self.dead:  # the usual case, once per batch sent
            actor = min(actors, key=lambda a: load[a])
            return actor if load[actor] < limit else None
        self._check()
        if all(a in self.dead for a in actors):
            raise ReplicasLost(f"all {len(actors)} replica(s) died and Ray did not restart them")
        room = [a for a in actors if a not in self.down and a not in self.dead and load[a] < limit]
        return min(room, key=lambda a: load[a], default=None)

    def up(self, actor: Any) -> bool:
        """Whether ``actor`` answers (neither down nor dead), its ping checked first."""
        if actor in self.down:
            self._check()
        return actor not in self.down and actor not in self.dead

    def wait(self, timeout: float) -> None:
        """Block until a down replica may be back (its ping resolves, or is due again), at
        most ``timeout`` s; return at once when none is down."""
        import ray

        self._check()
        if not self.down:
            return
        now = time.monotonic()
        refs = [ref for _, ref, _ in self.down.values() if ref is not None]
        due = min((sent + REPING_S - now for _, ref, sent in self.down.values() if ref is None), default=timeout)
        wait_s = max(0.0, min(timeout, due))
        if refs:
            ray.wait(refs, num_returns=1, timeout=wait_s)
        else:
            time.sleep(wait_s)

    def _check(self) -> None:
        import ray

        now = time.monotonic()
        for actor, (ping, ref, sent) in list(self.down.items()):
            if ref is None:  # failed fast before: ask again when due
                if now - sent >= REPING_S:
                    self.down[actor] = (ping, ping.remote(), now)
                continue
            if not ray.wait([ref], timeout=0)[0]:
                continue  # Ray is restarting it
            try:
                ray.get(ref)
                del self.down[actor]  # back
            except ray.exceptions.ActorUnavailableError:  # its loss not noticed yet
                self.down[actor] = (ping, None, sent)
            except ray.exceptions.RayError:
                del self.down[actor]
                self.dead.add(actor)
