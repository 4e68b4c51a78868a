"""Typed errors built from optd's application/problem+json answers (RFC 9457).

Every error the client raises is an :class:`OptdError`.  The subclass says
what family the HTTP status belongs to, so callers can catch ``NotFound`` or
``Conflict`` without comparing numbers; the members carry the problem body.
"""

__all__ = [
    "OptdError",
    "InvalidRequest",
    "Unprocessable",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "StaleGradient",
    "ServerError",
    "NotImplementedByServer",
    "Unavailable",
    "RoundTimeout",
    "ConnectionFailed",
    "ParamsDigestMismatch",
]


class OptdError(Exception):
    """An error answer from optd, or no answer at all (status 0).

    Members: ``status`` (HTTP status, 0 when no answer came), ``type``
    (``urn:optd:problem:...``), ``title``, ``detail``, ``field`` (the request
    field at fault, or None), ``step`` (the session's step for a stale
    gradient, or None), ``body`` (the whole problem document as a dict).
    ``kind`` names the family in words every optd client uses alike
    ("not_found", "conflict", "stale_gradient", ...; see
    api/client_constants.json).
    """

    kind = "error"

    def __init__(self, status, title="", detail="", type=None, field=None, step=None,
                 body=None):
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.field = field
        self.step = step
        self.body = body if body is not None else {}
        super().__init__(self._message())

    def _message(self):
        head = "%d %s" % (self.status, self.title) if self.status else self.title
        msg = "%s: %s" % (head, self.detail) if self.detail else head
        if self.field:
            msg += " (field %s)" % self.field
        return msg


class InvalidRequest(OptdError):
    """400, 405, 406, 413, 415: the request itself is wrong."""

    kind = "invalid_request"


class Forbidden(InvalidRequest):
    """403: a token whose scope is too small (``field`` "scope"), or a
    session outside its prefix (``field`` "prefix")."""


class TooManyRequests(InvalidRequest):
    """429: a token past a quota -- its step rate, or ``field``
    "max_sessions" / "max_params" on a create.  ``retry_after``: the
    seconds the daemon asked to wait (None when it named none)."""

    retry_after = None


class Unprocessable(InvalidRequest):
    """422: well-formed but unusable, e.g. a gradient of the wrong length or NaN."""

    kind = "unprocessable"


class Unauthorized(OptdError):
    """401: missing or wrong API key."""

    kind = "unauthorized"


class NotFound(OptdError):
    """404: no such session (or route)."""

    kind = "not_found"


class Conflict(OptdError):
    """409: a session exists with a different config, or the step conflicts."""

    kind = "conflict"


class StaleGradient(Conflict):
    """409 on ``base_step``: the gradient is too stale; ``step`` is the session's step."""

    kind = "stale_gradient"


class ServerError(OptdError):
    """5xx answers."""

    kind = "server_error"


class NotImplementedByServer(ServerError):
    """501: the daemon does not implement this (e.g. synchronous mode)."""


class Unavailable(ServerError):
    """503: the daemon could not do it now (storage); retried before it is raised."""

    kind = "unavailable"


class RoundTimeout(ServerError):
    """504: a synchronous round timed out."""

    kind = "round_timeout"


class ConnectionFailed(Unavailable):
    """No answer came: connection refused or reset, or a timeout, after every retry."""

    kind = "connection_failed"


class ParamsDigestMismatch(OptdError):
    """The params in an answer are not the ones the daemon sent: their CRC-32
    differs from the answer's Optd-Params-Crc32 (``expected``, ``actual``:
    8 hex digits).  ``status`` is the answer's status."""

    kind = "digest_mismatch"

    def __init__(self, status, expected, actual):
        self.expected = expected
        self.actual = actual
        super().__init__(status, title="params digest mismatch",
                         detail="the params received have CRC-32 %s, the daemon sent %s"
                         % (actual, expected))


def error_class(status, field=None):
    """The OptdError subclass for an HTTP status (and the field at fault)."""
    if status == 401:
        return Unauthorized
    if status == 403:
        return Forbidden
    if status == 429:
        return TooManyRequests
    if status == 404:
        return NotFound
    if status == 409:
        return StaleGradient if field == "base_step" else Conflict
    if status == 422:
        return Unprocessable
    if status == 501:
        return NotImplementedByServer
    if status == 503:
        return Unavailable
    if status == 504:
        return RoundTimeout
    if 400 <= status < 500:
        return InvalidRequest
    if status >= 500:
        return ServerError
    return OptdError


def from_problem(status, doc, fallback_detail=""):
    """Builds the typed error for an answer; doc is the parsed problem body
    (or None when the body was not a JSON object)."""
    if not isinstance(doc, dict):
        doc = {}
    field = doc.get("field")
    step = doc.get("step")
    cls = error_class(status, field)
    return cls(
        status,
        title=doc.get("title") or "HTTP %d" % status,
        detail=doc.get("detail") or fallback_detail,
        type=doc.get("type"),
        field=field,
        step=step if isinstance(step, int) else None,
        body=doc,
    )
