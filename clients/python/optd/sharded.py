"""ShardedSession: one logical parameter vector split by ranges over K
daemons, one optd session per daemon.

Every optimizer optd runs is elementwise, so each range updates exactly as
it would inside the whole vector -- except clipping by norm, which needs
the norm of the whole gradient.  The client computes that norm exactly as
one daemon would (optd.grad_norm, docs/api.md "The exact norm") and sends
it with every part (Optd-Grad-Norm), so the joined params equal a
one-session run bit for bit.

Names: shard i of session ``name`` is the session ``<name>.shard<i>`` on
daemon i (several shards may share a daemon).  Its metadata member
``optd_shard`` records {"index", "count", "offset", "size", "groups",
"layout"} (groups: the indices of the whole model's groups the shard
holds; layout: whether the model has tensors), so
ShardedSession.open can join the shards again.

With a layout (tensors), cuts fall on tensor boundaries (each tensor whole
in one shard) as near to equal sizes as the tensors allow; each shard gets
its tensors and the groups holding them (restricted to them).  Without a
layout the vector is cut into K nearly equal ranges.

A step sends one request per shard, concurrently, each with its own
Idempotency-Key derived from the step's key (``<key>.<i>``).  A shard whose
request fails with no answer, 503 or a timeout is retried alone with its
key, again and again until ``retry_for`` seconds have passed: the daemon
answers a step it already applied from its key, so no shard applies a step
twice, and the shards that answered are not asked again.
"""

import concurrent.futures
import math
import random
import time
from typing import Any, Dict, List, Optional, Sequence, Union

from . import _vec
from ._norm import grad_norm
from .client import Client, Session, Vector, new_idempotency_key
from .errors import ConnectionFailed, OptdError, ServerError, Unavailable

__all__ = ["ShardedSession", "ShardStepFailed", "shard_name"]

#: The metadata member a shard keeps its place in.
META = "optd_shard"


def _numpy() -> Any:
    if _vec._np is None:
        raise ImportError("ShardedSession needs NumPy (python3-numpy)")
    return _vec._np


def shard_name(name: str, i: int) -> str:
    return "%s.shard%d" % (name, i)


class ShardStepFailed(OptdError):
    """Some shards did not apply a step within retry_for seconds.  ``key``:
    the step's idempotency key (call step again with it: shards that
    applied it answer from their key and apply nothing); ``failed``: {shard
    index: the error}; ``applied``: the shard indices that did apply it."""

    kind = "shard_step_failed"

    def __init__(self, key, failed, applied):
        self.key = key
        self.failed = failed
        self.applied = applied
        first = next(iter(failed.values()))
        super().__init__(getattr(first, "status", 0), "shard step failed",
                         "shards %s did not apply step %s (%s); shards %s did"
                         % (sorted(failed), key, first, sorted(applied)))


def _transient(e):
    """Worth retrying with the same key: no answer, or the daemon (or what
    is in front of it) not serving right now."""
    return isinstance(e, (ConnectionFailed, Unavailable)) or (
        isinstance(e, ServerError) and e.status in (502, 503, 504))


def _tensor_list(tensors):
    out = []
    for t in tensors:
        if isinstance(t, dict):
            name, shape = t["name"], t["shape"]
        else:
            name, shape = t[0], t[1]
        shape = [int(d) for d in shape]
        out.append({"name": name, "shape": shape, "size": math.prod(shape)})
    return out


def _cuts_by_tensors(sizes, k):
    """Indices of the first tensor of shards 1..k-1: tensor boundaries as
    near to i*total/k as possible, each shard holding at least one tensor."""
    nt = len(sizes)
    if nt < k:
        raise ValueError("%d tensors cannot make %d shards: each shard holds whole tensors"
                         % (nt, k))
    ends = []  # ends[j]: elements before tensor j
    acc = 0
    for s in sizes:
        ends.append(acc)
        acc += s
    total = acc
    cuts = []
    prev = 0
    for i in range(1, k):
        target = i * total / k
        lo, hi = prev + 1, nt - (k - i)
        j = min(range(lo, hi + 1), key=lambda j: (abs(ends[j] - target), j))
        cuts.append(j)
        prev = j
    return cuts


class ShardedSession:
    """A session split over several daemons; see the module's text.

    Make one with ShardedSession.create (or open existing shards with
    ShardedSession.open).  ``shards``: the per-shard Sessions; ``offsets``:
    where each shard's range starts in the whole vector; ``size``;
    ``last_step`` (the step count every shard answered).
    """

    def __init__(self, name: str, sessions: Sequence[Session], offsets: Sequence[int],
                 size: int, tensor_sizes: Optional[List[int]], shard_groups: List[List[int]],
                 clip: Optional[Dict[str, Any]], mode: Optional[Dict[str, Any]],
                 retry_for: float = 60.0) -> None:
        self.name = name
        self.shards = list(sessions)
        self.offsets = list(offsets) + [size]
        self.size = int(size)
        self.dtype = self.shards[0].dtype
        self.tensor_sizes = tensor_sizes
        self.shard_groups = shard_groups
        self.retry_for = float(retry_for)
        self.last_step = self.shards[0].last_step
        self.last_lr = None
        self._configure(clip, mode)
        self._codec = _vec.Codec(self.dtype, True)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.shards))
        self.closed = False

    def _configure(self, clip, mode):
        """Whether steps carry the whole vector's norm, and of which type."""
        clip = clip or {}
        self._norm_type = None
        if clip.get("type") == "norm":
            nt = clip.get("norm_type", 2.0)
            m = mode or {}
            if m.get("type") == "sync" or int(m.get("accumulate", 1) or 1) > 1:
                raise ValueError("a sharded session cannot clip by norm in sync mode or with "
                                 "accumulation: the norm is the round's or the mean's")
            self._norm_type = float("inf") if nt in ("inf", "Infinity") else float(nt)

    def __repr__(self) -> str:
        return "optd.ShardedSession(%r, shards=%d, size=%d)" % (self.name, len(self.shards),
                                                               self.size)

    def close(self) -> None:
        """Stops the worker threads and closes the shards' clients."""
        if not self.closed:
            self.closed = True
            self._pool.shutdown(wait=True)
            for s in self.shards:
                s.client.close()

    def __enter__(self) -> "ShardedSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ making

    @staticmethod
    def _clients(daemons, client_args):
        out = []
        for d in daemons:
            out.append(d if isinstance(d, Client) else Client(d, **(client_args or {})))
        return out

    @classmethod
    def create(cls, daemons: Sequence[Union[str, Client]], name: str,
               optimizer: Union[str, Dict[str, Any]], params: Optional[Vector] = None,
               size: Optional[int] = None, dtype: str = "float32",
               tensors: Optional[Sequence[Any]] = None,
               groups: Optional[Sequence[Dict[str, Any]]] = None,
               init: Optional[Dict[str, Any]] = None,
               retry_for: float = 60.0, client_args: Optional[Dict[str, Any]] = None,
               metadata: Optional[Dict[str, Any]] = None,
               **config: Any) -> "ShardedSession":
        """Creates shard i of ``name`` on daemons[i] (a URL, or a Client)
        for every i, or verifies that they exist with this config.

        Like Client.create_session: ``optimizer``, ``params`` (the whole
        initial vector) or ``size``/``tensors`` with ``init`` (zeros only:
        a seeded init draws each session's values from its own stream, so
        a sharded vector would not be the one-session vector -- give
        params instead), ``dtype``, ``tensors`` and ``groups`` (the whole
        model's; each shard gets its own part), and ``schedule``, ``clip``,
        ``mode``, ``nonfinite``, ``retain`` as keywords, the same for every
        shard.  ``client_args``: keyword arguments for the Clients made from
        URLs.  ``retry_for``: seconds a failed shard step is retried alone.
        """
        clients = cls._clients(daemons, client_args)
        k = len(clients)
        if k < 1:
            raise ValueError("give at least one daemon")
        if init is not None and init.get("type") != "zeros":
            raise ValueError("a sharded session takes params (or zeros), not a seeded init")
        if params is not None and (size is not None or init is not None):
            raise ValueError("give either params or size (+ init), not both")
        codec = _vec.Codec(dtype, True)
        pvec = None
        if params is not None:
            pvec = codec._as_ndarray(params)
            if not _numpy().isfinite(pvec).all():
                raise ValueError("params contain NaN or Inf")
        tl = _tensor_list(tensors) if tensors is not None else None
        if tl is not None:
            total = sum(t["size"] for t in tl)
        elif pvec is not None:
            total = int(pvec.size)
        elif size is not None:
            total = int(size)
        else:
            raise ValueError("give params, or size, or tensors")
        if pvec is not None and pvec.size != total:
            raise ValueError("params hold %d values; the session has %d" % (pvec.size, total))
        if size is not None and int(size) != total:
            raise ValueError("size %d but the tensors hold %d" % (size, total))

        # The ranges: [first tensor, end tensor) per shard with a layout.
        if tl is not None:
            cuts = [0] + _cuts_by_tensors([t["size"] for t in tl], k) + [len(tl)]
            offsets = [sum(t["size"] for t in tl[:c]) for c in cuts[:-1]]
        else:
            if total < k:
                raise ValueError("%d values cannot make %d shards" % (total, k))
            cuts = None
            offsets = [i * total // k for i in range(k)]
        bounds = offsets + [total]

        # Groups per shard: the whole model's groups restricted to the
        # shard's tensors (a group with none of them is left out).
        gl = [dict(g) for g in groups] if groups is not None else None
        shard_groups: List[List[int]] = []
        shard_specs = []
        for i in range(k):
            spec: Dict[str, Any] = {}
            if tl is not None:
                mine = tl[cuts[i]:cuts[i + 1]]
                names = set(t["name"] for t in mine)
                spec["tensors"] = [{"name": t["name"], "shape": t["shape"]} for t in mine]
                if gl is not None:
                    gi, gs = [], []
                    for j, g in enumerate(gl):
                        held = [n for n in g.get("tensors", ()) if n in names]
                        if held:
                            gi.append(j)
                            gs.append(dict(g, tensors=held))
                    spec["groups"] = gs
                    shard_groups.append(gi)
                else:
                    shard_groups.append([0])
            else:
                if gl is not None:
                    raise ValueError("groups need tensors")
                spec["size"] = bounds[i + 1] - bounds[i]
                shard_groups.append([0])
            meta = dict(metadata or {})
            meta[META] = {"index": i, "count": k, "offset": bounds[i], "size": total,
                          "groups": shard_groups[i], "layout": tl is not None}
            spec["metadata"] = meta
            shard_specs.append(spec)

        def make(i):
            s = clients[i].create_session(shard_name(name, i), optimizer, dtype=dtype,
                                          init={"type": "zeros"}, **shard_specs[i], **config)
            if pvec is not None and (s.created or s.last_step == 0):
                s.set_params(pvec[bounds[i]:bounds[i + 1]], json=False)
            return s

        with concurrent.futures.ThreadPoolExecutor(max_workers=k) as pool:
            sessions = list(pool.map(make, range(k)))
        return cls(name, sessions, offsets, total,
                   [t["size"] for t in tl] if tl is not None else None, shard_groups,
                   config.get("clip"), config.get("mode"), retry_for=retry_for)

    @classmethod
    def open(cls, daemons: Sequence[Union[str, Client]], name: str, retry_for: float = 60.0,
             client_args: Optional[Dict[str, Any]] = None) -> "ShardedSession":
        """The existing shards of ``name`` on daemons (in shard order)."""
        clients = cls._clients(daemons, client_args)
        sessions = [c.session(shard_name(name, i)) for i, c in enumerate(clients)]
        docs = [s.info() for s in sessions]
        offsets: List[int] = []
        shard_groups: List[List[int]] = []
        tensor_sizes: List[int] = []
        total = 0
        for i, doc in enumerate(docs):
            m = (doc.get("metadata") or {}).get(META)
            if not m or m.get("index") != i or m.get("count") != len(clients):
                raise ValueError("%s is not shard %d of %d" % (sessions[i].name, i,
                                                              len(clients)))
            offsets.append(int(m["offset"]))
            shard_groups.append([int(g) for g in m["groups"]])
            total = int(m["size"])
            tensor_sizes += [int(t["size"]) for t in doc.get("tensors") or ()]
        has_layout = bool(docs[0]["metadata"][META].get("layout"))
        return cls(name, sessions, offsets, total, tensor_sizes if has_layout else None,
                   shard_groups, docs[0].get("clip"), docs[0].get("mode"), retry_for=retry_for)

    # ------------------------------------------------------------ using

    def _run(self, key, fn):
        """fn(i) on every shard concurrently; a shard failing transiently is
        retried alone until retry_for has passed.  Returns the results."""
        k = len(self.shards)
        results: List[Any] = [None] * k
        todo = list(range(k))
        deadline = time.monotonic() + self.retry_for
        wait = 0.1
        errors: Dict[int, BaseException] = {}
        while todo:
            futs = {i: self._pool.submit(fn, i) for i in todo}
            todo, errors = [], {}
            for i, f in futs.items():
                try:
                    results[i] = f.result()
                except OptdError as e:
                    if not _transient(e):
                        raise
                    errors[i] = e
                    todo.append(i)
            if todo:
                if time.monotonic() + wait > deadline:
                    applied = [i for i in range(k) if i not in errors]
                    raise ShardStepFailed(key, errors, applied)
                time.sleep(wait * (0.5 + random.random() / 2))
                wait = min(wait * 2, 2.0)
        return results

    def _group_values(self, groups, i):
        if groups is None:
            return None
        return [groups[g] for g in self.shard_groups[i]]

    def step(self, grad: Vector, loss: Optional[float] = None,
             idempotency_key: Optional[str] = None, params: bool = True,
             groups: Optional[Sequence[Dict[str, Any]]] = None,
             worker: Optional[str] = None, base_step: Optional[int] = None) -> Optional[Vector]:
        """Applies one gradient of the whole vector: each shard its range,
        concurrently; returns the joined params (None with params=False).
        A non-finite gradient raises ValueError before anything is sent.
        ``groups``: the whole model's per-group values (as Session.step).
        ``idempotency_key``: the step's key (a fresh one unless given);
        shard i uses ``<key>.<i>``."""
        g = self._codec._as_ndarray(grad)
        if g.size != self.size:
            raise ValueError("grad has %d values; the session has %d" % (g.size, self.size))
        if not _numpy().isfinite(g).all():
            raise ValueError("grad contains NaN or Inf: no shard was sent anything")
        norm = None
        if self._norm_type is not None:
            norm = grad_norm(g, self.dtype, self.tensor_sizes, self._norm_type)
        key = idempotency_key or new_idempotency_key()
        if len(key) > 190:
            raise ValueError("idempotency_key: at most 190 characters (the shards add .<i>)")
        o = self.offsets

        def one(i):
            s = self.shards[i]
            return s.step(g[o[i]:o[i + 1]], loss=loss, params=params, json=False,
                          idempotency_key="%s.%d" % (key, i), grad_norm=norm,
                          groups=self._group_values(groups, i), worker=worker,
                          base_step=base_step, wire=None)

        parts = self._run(key, one)
        steps = set(s.last_step for s in self.shards)
        if len(steps) != 1:
            raise OptdError(0, "shards disagree",
                            "after step %s the shards are at steps %s"
                            % (key, [s.last_step for s in self.shards]))
        self.last_step = steps.pop()
        self.last_lr = self.shards[0].last_lr
        if not params:
            return None
        return _numpy().concatenate(parts)

    def params(self) -> Vector:
        """The whole vector: every shard's params, joined."""
        parts = self._run("params", lambda i: self.shards[i].params(json=False, wire=None))
        self.last_step = self.shards[0].last_step
        return _numpy().concatenate(parts)

    def set_params(self, params: Vector) -> None:
        """Overwrites the whole vector (each shard its range)."""
        p = self._codec._as_ndarray(params)
        if p.size != self.size:
            raise ValueError("params hold %d values; the session has %d" % (p.size, self.size))
        o = self.offsets
        self._run("set_params",
                  lambda i: self.shards[i].set_params(p[o[i]:o[i + 1]], json=False, wire=None))

    def steps(self) -> List[int]:
        """Each shard's step count, as its daemon reports it now."""
        return [int(d["step"]) for d in self._run("info", lambda i: self.shards[i].info())]

    def update(self, **changes: Any) -> List[Dict[str, Any]]:
        """The same PATCH on every shard (optimizer=, schedule=, clip=, ...);
        returns the shards' documents."""
        if "groups" in changes:
            raise ValueError("change groups shard by shard (shards[i].update(groups=...))")
        docs = self._run("update", lambda i: self.shards[i].update(**changes))
        self._configure(docs[0].get("clip"), docs[0].get("mode"))
        return docs

    def delete(self) -> None:
        """Deletes every shard."""
        self._run("delete", lambda i: self.shards[i].delete())
