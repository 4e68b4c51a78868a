"""Client and Session: optd's HTTP API in Python idiom."""

import json as _json
import math
import os
import re
import ssl
import urllib.parse
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from . import _vec, _wire
from ._constants import BACKOFF, BINARY_THRESHOLD, HEADERS, MAX_BACKOFF, NAME_PATTERN, RETRIES
from ._http import Transport
from .errors import OptdError, ParamsDigestMismatch, from_problem

__all__ = ["Client", "Session", "new_idempotency_key"]

_NAME = re.compile(NAME_PATTERN)

#: A vector: a sequence of floats, an array.array, or a NumPy array.
Vector = Union[Sequence[float], Any]

_JSON = "application/json"
_BINARY = "application/octet-stream"

#: A per-call ``wire`` left out: the client's own choice.
_CLIENT_WIRE = object()
#: Headers of a step (JSON or binary) that carry the absent tensors and the
#: groups' client-driven hyperparameters (one value per group, in group order).
STEP_HEADERS = {
    "absent": "Optd-Absent",
    "lr": "Optd-Group-Lr",
    "momentum": "Optd-Group-Momentum",
    "beta1": "Optd-Group-Beta1",
    "grad_norm": "Optd-Grad-Norm",
}
#: What a step may carry per group.
GROUP_STEP_KEYS = ("lr", "momentum", "beta1")


def new_idempotency_key() -> str:
    """128 random bits as 32 hex digits."""
    return os.urandom(16).hex()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError("session names are 1-128 characters of A-Z a-z 0-9 . _ -, not %r"
                         % (name,))
    return name


def _path(name: str, tail: str = "") -> str:
    return "/v1/sessions/" + _check_name(name) + tail


def _parse_int(text):
    # The daemon prints a float's -0.0 as "-0", which int() would turn into
    # a plain 0 and lose the sign bit.
    return -0.0 if text == "-0" else int(text)


def _decode_json(resp):
    if not resp.body:
        return None
    try:
        return _json.loads(resp.body, parse_int=_parse_int)
    except ValueError:
        return None


def _raise_for(resp):
    """Turns any non-2xx answer into its typed OptdError."""
    if 200 <= resp.status < 300:
        return
    doc = _decode_json(resp)
    fallback = resp.body[:200].decode("utf-8", "replace") if doc is None else ""
    err = from_problem(resp.status, doc, fallback)
    ra = resp.header("retry-after")
    if resp.status == 429 and ra is not None:
        try:
            err.retry_after = float(ra)
        except ValueError:
            pass
    raise err


def _json_doc(resp):
    _raise_for(resp)
    doc = _decode_json(resp)
    if doc is None:
        raise OptdError(resp.status, title="bad answer",
                        detail="expected a JSON body, got %d bytes" % len(resp.body))
    return doc


def _ranges(indices):
    """Sorted tensor indices as the Optd-Absent list: "0-57,60"."""
    out = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in out)


def _check_absent(absent):
    """absent as a list of tensor indices (ints) or names (strs)."""
    out = []
    for a in absent:
        if isinstance(a, bool) or not isinstance(a, (int, str)):
            raise ValueError("absent lists tensor indices or names, not %r" % (a,))
        if isinstance(a, int) and a < 0:
            raise ValueError("absent tensor index %d is negative" % a)
        out.append(a)
    return out


def _check_step_groups(groups):
    """Validates the per-group hyperparameters of a step: a list with one
    dict per group, each holding some of lr, momentum, beta1."""
    if not isinstance(groups, (list, tuple)):
        raise ValueError("groups must be a list with one dict per group")
    out = []
    for i, g in enumerate(groups):
        if not isinstance(g, dict):
            raise ValueError("groups[%d] must be a dict" % i)
        bad = sorted(set(g) - set(GROUP_STEP_KEYS))
        if bad:
            raise ValueError("groups[%d]: a step carries only %s, not %s"
                             % (i, ", ".join(GROUP_STEP_KEYS), ", ".join(bad)))
        d = {}
        for k, v in g.items():
            d[k] = float(v)
            if not math.isfinite(d[k]):
                raise ValueError("groups[%d].%s must be finite" % (i, k))
        out.append(d)
    keys = [sorted(g) for g in out]
    if any(k != keys[0] for k in keys):
        raise ValueError("every group of a step must carry the same hyperparameters")
    return out


def _check_digest(resp, raw):
    """raw: the params as little-endian bytes in the session's dtype."""
    want = resp.header(HEADERS["params_crc32"])
    if want is None:
        return
    got = "%08x" % (zlib.crc32(raw) & 0xFFFFFFFF)
    if got != want.lower():
        raise ParamsDigestMismatch(resp.status, want, got)


def _int_header(resp, name):
    v = resp.header(name)
    return int(v) if v is not None else None


def _float_header(resp, name):
    v = resp.header(name)
    return float(v) if v is not None else None


class Client:
    """A connection to one optd daemon.

    ``url``: the daemon's base URL.  ``api_key``: sent as
    ``Authorization: Bearer KEY``.  ``timeout``: seconds per attempt.
    ``retries``: how many times a transient failure is retried (so at most
    retries + 1 attempts), waiting ``backoff`` seconds doubling up to
    ``max_backoff``, with jitter.  ``numpy``: None uses NumPy arrays when
    NumPy is importable, False always hands back ``array.array``.
    ``verify_params``: check the params of every answer against its
    Optd-Params-Crc32 (the CRC-32 of the params in the session's dtype) and
    raise ParamsDigestMismatch when they differ.
    ``wire``: None sends and receives vectors in the session's dtype;
    "bfloat16" or "float16" sends gradients and receives params in that
    16-bit form (half of float32's bytes, always as a binary body), rounded
    to nearest even from float32 exactly as the daemon does.  Each call can
    override it with its own ``wire=``.
    ``https://`` URLs: ``ca_file`` is a PEM bundle the daemon's certificate
    must verify against (None: the system's CAs); ``cert_file`` and
    ``key_file`` (PEM, both or neither) are the client certificate a daemon
    started with ``--tls-client-ca`` requires; or ``ssl_context``, an
    ``ssl.SSLContext`` of your own instead of those three.

    A client keeps one keep-alive connection; threads may share it (their
    requests take turns), or make one client each to run in parallel.
    """

    def __init__(self, url: str = "http://127.0.0.1:8080", api_key: Optional[str] = None,
                 timeout: float = 60.0, retries: int = RETRIES, backoff: float = BACKOFF,
                 max_backoff: float = MAX_BACKOFF, numpy: Optional[bool] = None,
                 binary_threshold: int = BINARY_THRESHOLD, verify_params: bool = True,
                 wire: Optional[str] = None, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.url = url
        self.verify_params = bool(verify_params)
        self._t = Transport(url, api_key=api_key, timeout=timeout, retries=retries,
                            backoff=backoff, max_backoff=max_backoff, ca_file=ca_file,
                            cert_file=cert_file, key_file=key_file, ssl_context=ssl_context)
        self.use_numpy = _vec.numpy_available() if numpy is None else bool(numpy)
        if self.use_numpy and not _vec.numpy_available():
            raise ValueError("numpy=True but NumPy cannot be imported")
        self.binary_threshold = int(binary_threshold)
        self.wire = _wire.check_wire(wire)

    def __repr__(self) -> str:
        return "optd.Client(%r)" % (self.url,)

    def close(self) -> None:
        """Closes the connection (the next call opens a new one)."""
        self._t.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method, path, body=None, headers=None):
        return self._t.request(method, path, body=body, headers=headers)

    def _get_json(self, path):
        return _json_doc(self._request("GET", path, headers={"Accept": _JSON}))

    def _send_json(self, method, path, doc):
        body = _json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        return self._request(method, path, body=body,
                             headers={"Content-Type": _JSON, "Accept": _JSON})

    # ------------------------------------------------------------ calls

    def health(self) -> Dict[str, Any]:
        """GET /healthz: {"status": "ok", ...}."""
        return self._get_json("/healthz")

    def optimizers(self) -> Dict[str, Any]:
        """GET /v1/optimizers: every optimizer, schedule, clip kind and mode
        with its hyperparameters and defaults."""
        return self._get_json("/v1/optimizers")

    def sessions(self, page_size: int = 100) -> Iterator[Dict[str, Any]]:
        """Iterates over every session (summaries: name, step, optimizer,
        dtype, size, created_at, updated_at), fetching page after page."""
        after = None
        while True:
            q = {"limit": str(page_size)}
            if after is not None:
                q["after"] = after
            doc = self._get_json("/v1/sessions?" + urllib.parse.urlencode(q))
            yield from doc.get("sessions", [])
            after = doc.get("next")
            if after is None:
                return

    def session(self, name: str) -> "Session":
        """The existing session called name (NotFound when there is none)."""
        return Session(self, self._get_json(_path(name)), created=False)

    def create_session(self, name: str, optimizer: Union[str, Dict[str, Any]],
                       params: Optional[Vector] = None, size: Optional[int] = None,
                       init: Optional[Dict[str, Any]] = None, dtype: str = "float32",
                       schedule: Optional[Dict[str, Any]] = None,
                       clip: Optional[Dict[str, Any]] = None,
                       mode: Optional[Dict[str, Any]] = None, nonfinite: Optional[str] = None,
                       metadata: Optional[Dict[str, Any]] = None,
                       retain: Optional[Dict[str, int]] = None,
                       tensors: Optional[Sequence[Any]] = None,
                       groups: Optional[Sequence[Dict[str, Any]]] = None) -> "Session":
        """Creates the session, or verifies that it exists with this config.

        ``optimizer``: {"type": "adam", "lr": 1e-3, ...} with torch.optim's
        names (or just the type as a string).  Either ``params`` (a vector:
        the initial parameters) or ``size`` and ``init`` ({"type": "zeros"},
        {"type": "normal", "std": s, "seed": n}, {"type": "uniform", ...};
        zeros when left out).  The rest is left to the daemon's defaults when
        None.  ``tensors``: the layout, ordered {"name", "shape"} dicts (or
        (name, shape) pairs) whose concatenation is the vector; ``size`` may
        then be left out.  ``groups``: torch's param_groups, dicts listing
        their "tensors" by name, each may override any hyperparameter of
        the optimizer.  Returns the Session; ``session.created`` says whether this call
        created it (201) or found it (200, its params kept as they are).  A
        session of the same name with a different config raises Conflict.
        """
        _vec.check_dtype(dtype)
        if isinstance(optimizer, str):
            optimizer = {"type": optimizer}
        doc: Dict[str, Any] = {"optimizer": optimizer, "dtype": dtype}
        if params is not None:
            if size is not None or init is not None:
                raise ValueError("give either params or size (+ init), not both")
            codec = _vec.Codec(dtype, self.use_numpy)
            if not codec.finite(params):
                raise ValueError("params contain NaN or Inf")
            doc["params"] = codec.to_list(params)
        else:
            if size is None and tensors is None:
                raise ValueError("give params, or size (+ init), or tensors")
            if size is not None:
                doc["size"] = int(size)
            doc["init"] = init if init is not None else {"type": "zeros"}
        if tensors is not None:
            doc["tensors"] = [
                {"name": t["name"], "shape": [int(d) for d in t["shape"]]}
                if isinstance(t, dict) else {"name": t[0], "shape": [int(d) for d in t[1]]}
                for t in tensors]
        if groups is not None:
            doc["groups"] = [dict(g) for g in groups]
        for key, value in (("schedule", schedule), ("clip", clip), ("mode", mode),
                           ("nonfinite", nonfinite), ("metadata", metadata),
                           ("retain", retain)):
            if value is not None:
                doc[key] = value
        resp = self._send_json("PUT", _path(name), doc)
        return Session(self, _json_doc(resp), created=resp.status == 201)

    def fork(self, name: str, source: str, step: Optional[int] = None, replay: bool = False,
             **changes: Any) -> "Session":
        """Creates session ``name`` from session ``source`` as it was after
        ``step`` (default: its current step), sharing nothing with it.
        ``changes`` are what PATCH takes (optimizer={"lr": ...}, schedule=...,
        retain=...).  ``replay=True`` re-applies the source's logged
        gradients after ``step`` under the new config (a counterfactual
        run), answering when done."""
        fork: Dict[str, Any] = {"from": _check_name(source)}
        if step is not None:
            fork["step"] = int(step)
        doc = dict(changes, fork=fork)
        if replay:
            doc["replay"] = True
        resp = self._send_json("PUT", _path(name), doc)
        return Session(self, _json_doc(resp), created=True)

    # ----------------------------------------------------------- tokens

    def create_token(self, scopes: Sequence[str], prefix: str = "",
                     label: Optional[str] = None, expires_in: Optional[int] = None,
                     expires_at: Optional[str] = None,
                     quotas: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """POST /v1/tokens (the admin key only): mints a token.  ``scopes``:
        any of "read", "step", "admin" (each holds the ones before it);
        ``prefix``: the session-name prefix it is bound to ("" = every
        name); ``expires_in`` seconds or ``expires_at`` (RFC 3339 UTC);
        ``quotas``: {"max_sessions", "max_params", "steps_per_second",
        "burst"}.  Returns the token's document; its secret, in "token", is
        shown this once."""
        doc: Dict[str, Any] = {"scopes": list(scopes), "prefix": prefix}
        for key, value in (("label", label), ("expires_in", expires_in),
                           ("expires_at", expires_at), ("quotas", quotas)):
            if value is not None:
                doc[key] = value
        return _json_doc(self._send_json("POST", "/v1/tokens", doc))

    def list_tokens(self) -> List[Dict[str, Any]]:
        """GET /v1/tokens (the admin key only): every token, revoked and
        expired ones included; never a secret."""
        return list(self._get_json("/v1/tokens").get("tokens", []))

    def get_token(self, token_id: str) -> Dict[str, Any]:
        """GET /v1/tokens/{id} (the admin key only): the token and its
        usage (sessions it created, their params)."""
        return self._get_json("/v1/tokens/" + _check_name(token_id))

    def revoke_token(self, token_id: str) -> None:
        """DELETE /v1/tokens/{id} (the admin key only): the next request
        that carries the token is refused."""
        _raise_for(self._request("DELETE", "/v1/tokens/" + _check_name(token_id),
                                 headers={"Accept": _JSON}))

    def import_session(self, name: str, data: bytes) -> "Session":
        """Creates session ``name`` from an export file (Session.export)."""
        resp = self._request("PUT", _path(name, "/export"), body=bytes(data),
                             headers={"Content-Type": _BINARY, "Accept": _JSON})
        return Session(self, _json_doc(resp), created=True)


class Session:
    """One optimizer session on the daemon.

    ``name``, ``dtype``, ``size``; ``created`` (this object's create call made
    it); after each call that reports one: ``last_step`` (updates applied so
    far), ``last_lr`` (the learning rate of the last update, None when the
    last step applied nothing), ``last_replayed`` (the daemon answered a step
    from its idempotency record), ``pending`` (gradients waiting in an
    accumulation, from a 202 answer; 0 otherwise).
    """

    def __init__(self, client: Client, doc: Dict[str, Any], created: bool = False) -> None:
        self.client = client
        self.name = doc["name"]
        self.dtype = doc["dtype"]
        self.size = int(doc["size"])
        #: the layout: [{"name", "shape", "offset", "size"}, ...]
        self.tensors = doc.get("tensors")
        #: the param groups: [{"tensors": [...], "optimizer": {...}, "lr": x}, ...]
        self.groups = doc.get("groups")
        self.created = created
        self.last_step = doc.get("step")
        self.last_lr = None
        self.last_replayed = False
        self.pending = 0
        self._codec = _vec.Codec(self.dtype, client.use_numpy)

    def __repr__(self) -> str:
        return "optd.Session(%r, dtype=%r, size=%d)" % (self.name, self.dtype, self.size)

    def _binary(self, n, json):
        if json is None:
            return n > self.client.binary_threshold
        return not json

    def _wire(self, wire, json):
        """The 16-bit form a call uses (None: the session's dtype)."""
        wire = self.client.wire if wire is _CLIENT_WIRE else _wire.check_wire(wire)
        if wire is not None and json:
            raise ValueError("%s travels only as a binary body; leave json out" % wire)
        return wire

    def _from_binary(self, resp):
        """The params of a binary answer, widened from the form its
        Optd-Dtype names.  The digest covers the params in the session's
        dtype: a 16-bit answer, a rounding of them, is not checked."""
        form = resp.header(HEADERS["dtype"])
        if form in _wire.WIRES:
            return _wire.widen(resp.body, form, self.dtype, self._codec.use_numpy)
        return self._received(resp, self._codec.from_bytes(resp.body), resp.body)

    def step(self, grad: Vector, loss: Optional[float] = None, base_step: Optional[int] = None,
             worker: Optional[str] = None, params: bool = True, json: Optional[bool] = None,
             idempotency_key: Optional[str] = None, absent: Optional[Sequence[Any]] = None,
             groups: Optional[Sequence[Dict[str, Any]]] = None,
             wire: Any = _CLIENT_WIRE, grad_norm: Optional[float] = None) -> Optional[Vector]:
        """Applies one gradient; returns the new params (None with
        params=False): always the whole vector.

        ``absent``: tensors without a gradient (indices or names; torch's
        ``p.grad is None``): their params, buffers and step counts stay as
        they are, and ``grad`` holds only the present tensors' gradients,
        concatenated in tensor order.  ``groups``: one dict per group with
        the client-driven hyperparameters of this step (``lr``,
        ``momentum``, ``beta1``: betas[0]); they become the group's values
        from this step on (change anything else with update(groups=...)).
        Both travel in headers (Optd-Absent, Optd-Group-Lr, ...), whichever
        the body's form.

        ``loss`` is recorded in the history (and drives reduce_on_plateau);
        ``base_step`` is the step the gradient was computed at (for the
        staleness bound); ``worker`` names the sender.  ``json``: None sends
        vectors longer than the client's binary_threshold as raw bytes and
        shorter ones as JSON; True / False force one.  Every call carries an
        Idempotency-Key -- a fresh one unless given -- reused by the
        client's retries, so a gradient is never applied twice.  ``wire``
        ("bfloat16" / "float16"; None for the session's dtype; default the
        client's) sends the gradient and receives the params in 16 bits.
        ``grad_norm``: the norm of the whole vector this gradient is a part
        of (Optd-Grad-Norm, for a session clipping by norm that holds one
        range of a larger vector: see ShardedSession and optd.grad_norm).
        """
        key = idempotency_key or new_idempotency_key()
        absent = _check_absent(absent) if absent else None
        groups = _check_step_groups(groups) if groups else None
        n = self._codec.length(grad)
        wire = self._wire(wire, json)
        binary = wire is not None or self._binary(n, json)
        loss = None if loss is None else float(loss)
        if loss is not None and not math.isfinite(loss):
            raise ValueError("loss must be finite, not %r (leave it out instead)" % loss)
        if not binary and not self._codec.finite(grad):
            # JSON has no NaN or Inf; only the binary form can carry them
            # (to a session whose nonfinite policy is "skip").
            if json:
                raise ValueError("grad is not finite: JSON cannot carry it; use json=False")
            binary = True
        path = _path(self.name, "/step") + ("" if params else "?params=false")
        headers = {HEADERS["idempotency_key"]: key}
        if grad_norm is not None:
            grad_norm = float(grad_norm)
            if not (math.isfinite(grad_norm) and grad_norm >= 0):
                raise ValueError("grad_norm must be a finite number >= 0, not %r" % grad_norm)
            headers[STEP_HEADERS["grad_norm"]] = "%.17g" % grad_norm
        if absent:
            headers[STEP_HEADERS["absent"]] = _ranges(self._tensor_indices(absent))
        if groups:
            for k in groups[0]:
                # %.17g: every double reads back exactly
                headers[STEP_HEADERS[k]] = ",".join("%.17g" % g[k] for g in groups)
        if binary:
            headers.update({"Content-Type": _BINARY, "Accept": _BINARY})
            if wire is not None:
                body = _wire.narrow(grad, wire, self._codec.use_numpy)
                headers[HEADERS["dtype"]] = wire
                headers[_wire.PARAMS_DTYPE] = wire
            else:
                body = self._codec.to_bytes(grad)
            if loss is not None:
                headers[HEADERS["loss"]] = repr(loss)
            if base_step is not None:
                headers[HEADERS["base_step"]] = str(int(base_step))
            if worker is not None:
                headers[HEADERS["worker"]] = str(worker)
        else:
            doc = {"grad": self._codec.to_list(grad)}
            if loss is not None:
                doc["loss"] = loss
            if base_step is not None:
                doc["base_step"] = int(base_step)
            if worker is not None:
                doc["worker"] = str(worker)
            body = _json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
            headers.update({"Content-Type": _JSON, "Accept": _JSON})
        resp = self.client._request("POST", path, body=body, headers=headers)
        _raise_for(resp)
        self.last_step = _int_header(resp, HEADERS["step"])
        self.last_lr = _float_header(resp, HEADERS["lr"])
        self.last_replayed = resp.header(HEADERS["replayed"]) == "true"
        self.pending = _int_header(resp, HEADERS["pending"]) or 0
        if binary:
            return self._from_binary(resp) if params else None
        doc = _json_doc(resp)
        self.last_step = doc.get("step", self.last_step)
        if "lr" in doc:
            self.last_lr = doc["lr"]
        return self._received(resp, self._codec.from_list(doc["params"])) if params else None

    def _received(self, resp, vec, raw=None):
        """vec, after checking it against the answer's params digest."""
        if self.client.verify_params:
            _check_digest(resp, raw if raw is not None else self._codec.to_bytes(vec))
        return vec

    def _tensor_indices(self, absent):
        """Names in absent turned into tensor indices (the binary form
        carries indices only)."""
        index = {t["name"]: i for i, t in enumerate(self.tensors or ())}
        out = []
        for a in absent:
            if isinstance(a, str):
                if a not in index:
                    raise ValueError("session %s has no tensor named %r" % (self.name, a))
                a = index[a]
            out.append(a)
        return out

    def state(self) -> bytes:
        """GET /state: the whole optimizer state -- params, every buffer per
        tensor, per-tensor steps and scalars -- as a safetensors file
        (optd._safetensors reads it)."""
        resp = self.client._request("GET", _path(self.name, "/state"),
                                    headers={"Accept": _BINARY})
        _raise_for(resp)
        return resp.body

    def load_state(self, data: bytes) -> Dict[str, Any]:
        """PUT /state: replaces params, buffers and per-tensor state with a
        file from state() (the hyperparameters are kept).  Returns the
        session document."""
        resp = self.client._request("PUT", _path(self.name, "/state"), body=bytes(data),
                                    headers={"Content-Type": _BINARY, "Accept": _JSON})
        doc = _json_doc(resp)
        self._refresh(doc)
        return doc

    def _refresh(self, doc):
        self.last_step = doc.get("step", self.last_step)
        self.tensors = doc.get("tensors", self.tensors)
        self.groups = doc.get("groups", self.groups)

    def params(self, json: Optional[bool] = None, wire: Any = _CLIENT_WIRE) -> Vector:
        """The current params (and last_step); ``wire`` as for step()."""
        wire = self._wire(wire, json)
        if wire is not None or self._binary(self.size, json):
            headers = {"Accept": _BINARY}
            if wire is not None:
                headers[_wire.PARAMS_DTYPE] = wire
            resp = self.client._request("GET", _path(self.name, "/params"), headers=headers)
            _raise_for(resp)
            self.last_step = _int_header(resp, HEADERS["step"])
            return self._from_binary(resp)
        resp = self.client._request("GET", _path(self.name, "/params"),
                                    headers={"Accept": _JSON})
        doc = _json_doc(resp)
        self.last_step = doc["step"]
        return self._received(resp, self._codec.from_list(doc["params"]))

    def set_params(self, params: Vector, json: Optional[bool] = None,
                   wire: Any = _CLIENT_WIRE) -> None:
        """Overwrites the params (optimizer state and step are kept);
        ``wire`` as for step()."""
        wire = self._wire(wire, json)
        if wire is not None:
            resp = self.client._request(
                "PUT", _path(self.name, "/params"), body=_wire.narrow(params, wire, self._codec.use_numpy),
                headers={"Content-Type": _BINARY, "Accept": _JSON, HEADERS["dtype"]: wire})
        elif self._binary(self._codec.length(params), json):
            resp = self.client._request(
                "PUT", _path(self.name, "/params"), body=self._codec.to_bytes(params),
                headers={"Content-Type": _BINARY, "Accept": _JSON})
        else:
            resp = self.client._send_json("PUT", _path(self.name, "/params"),
                                          {"params": self._codec.to_list(params)})
        self.last_step = _json_doc(resp)["step"]

    def update(self, lr: Optional[float] = None, **changes: Any) -> Dict[str, Any]:
        """Changes the session mid-run (PATCH): optimizer={"lr": ...},
        groups=[{...}, {}, ...] (one dict per group: the hyperparameters to
        change in it), schedule=..., clip=..., mode=..., metadata=...; ``lr=x`` is short for
        optimizer={"lr": x}.  Returns the session document."""
        if lr is not None:
            changes["optimizer"] = dict(changes.get("optimizer") or {}, lr=lr)
        doc = _json_doc(self.client._send_json("PATCH", _path(self.name), changes))
        self._refresh(doc)
        return doc

    def info(self) -> Dict[str, Any]:
        """The session document: config with every default, step, next lr,
        state, counters, timestamps."""
        doc = self.client._get_json(_path(self.name))
        self._refresh(doc)
        return doc

    def history(self, after: int = 0, limit: Optional[int] = None,
                page_size: int = 100) -> List[Dict[str, Any]]:
        """The step log's metrics after step ``after``, oldest first: a list
        of {step, time, lr, loss, grad_norm, update_norm, worker?}; at most
        ``limit`` entries when given."""
        out: List[Dict[str, Any]] = []
        while limit is None or len(out) < limit:
            n = page_size if limit is None else min(page_size, limit - len(out))
            q = urllib.parse.urlencode({"after": str(after), "limit": str(n)})
            doc = self.client._get_json(_path(self.name, "/history?" + q))
            out.extend(doc.get("steps", []))
            after = doc.get("next")
            if after is None:
                break
        return out

    def checkpoint(self, label: str) -> Dict[str, Any]:
        """Keeps the current state as a checkpoint labelled ``label``
        (unique in the session); returns {step, time, label, kind}."""
        return _json_doc(self.client._send_json("POST", _path(self.name, "/checkpoints"),
                                                {"label": label}))

    def checkpoints(self) -> Dict[str, Any]:
        """{"checkpoints": [{step, time, label, kind, bytes}...], "oldest_step",
        "step"}: the kept checkpoints, oldest first."""
        return self.client._get_json(_path(self.name, "/checkpoints"))

    def rollback(self, step: Optional[int] = None, label: Optional[str] = None) -> Dict[str, Any]:
        """Returns the session to what it was after ``step`` (or at the
        checkpoint ``label``); later steps, checkpoints and idempotency keys
        are gone.  Returns the session document."""
        if (step is None) == (label is None):
            raise ValueError("give step or label")
        body: Dict[str, Any] = {"step": int(step)} if step is not None else {"label": label}
        doc = _json_doc(self.client._send_json("POST", _path(self.name, "/rollback"), body))
        self.last_step = doc.get("step")
        return doc

    def export(self, log: bool = False) -> bytes:
        """The whole session as one file (safetensors: state, config, layout;
        with ``log=True`` the log too), for Client.import_session."""
        resp = self.client._request("GET", _path(self.name, "/export?log=%s" %
                                                 ("true" if log else "false")),
                                    headers={"Accept": _BINARY})
        _raise_for(resp)
        return resp.body

    def delete(self) -> None:
        """Deletes the session and its state."""
        resp = self.client._request("DELETE", _path(self.name), headers={"Accept": _JSON})
        if resp.status == 404 and resp.attempts > 1:
            # An earlier attempt deleted it but its answer was lost.
            return
        _raise_for(resp)
