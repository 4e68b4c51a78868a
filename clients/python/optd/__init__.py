"""optd -- the Python client of the optd optimizer daemon.

    import optd
    client = optd.Client("http://127.0.0.1:8080")
    s = client.create_session("mlp", {"type": "adam", "lr": 1e-3}, size=1000,
                              init={"type": "normal", "std": 0.1, "seed": 1})
    params = s.step(grad, loss=loss)

Standard library only; NumPy arrays when NumPy is importable.  The
torch.optim adapter lives in optd.torch (imported on demand).
"""

from ._norm import grad_norm
from .client import Client, Session, new_idempotency_key
from .sharded import ShardedSession, ShardStepFailed
from .errors import (
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidRequest,
    NotFound,
    NotImplementedByServer,
    OptdError,
    ParamsDigestMismatch,
    RoundTimeout,
    ServerError,
    StaleGradient,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    Unprocessable,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Session",
    "new_idempotency_key",
    "grad_norm",
    "ShardedSession",
    "ShardStepFailed",
    "OptdError",
    "InvalidRequest",
    "Unprocessable",
    "Unauthorized",
    "Forbidden",
    "TooManyRequests",
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
