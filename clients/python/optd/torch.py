"""optd.torch -- a torch.optim.Optimizer whose updates optd applies.

    from optd.torch import RemoteOptimizer
    opt = RemoteOptimizer(model.parameters(), session="mlp",
                          url="http://127.0.0.1:8080",
                          optimizer={"type": "adam", "lr": 1e-3})
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

The base package never imports torch; only importing this module does.
"""

from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch

from . import _vec
from ._constants import RETRIES
from .client import Client

__all__ = ["RemoteOptimizer"]

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class RemoteOptimizer(torch.optim.Optimizer):
    """All parameters (in order) form one flat vector: one optd session.

    On construction the session is created with the tensors' current values
    as its initial params, or -- when a session of that name and config
    already exists -- its params are copied into the tensors, so a restarted
    training run resumes where the daemon left off.  ``step`` concatenates
    every ``p.grad`` (zeros where it is None), sends it with the closure's
    loss if a closure is given, and copies the new params back in place.

    ``optimizer``: {"type": "adam", "lr": 1e-3, ...} (torch.optim names).
    ``schedule``, ``clip``, ``mode``, ``metadata``: as in
    Client.create_session.  ``dtype``: "float32" or "float64"; by default
    float64 when every parameter is float64, else float32.  Give ``client``
    to share an optd.Client, else one is made from ``url``, ``api_key``,
    ``timeout`` and ``retries``.  Per-group hyperparameters are refused: one
    session has one optimizer config (use the optimizer dict instead).
    """

    def __init__(self, params: Iterable[Any], session: str, url: str = "http://127.0.0.1:8080",
                 optimizer: Union[str, Dict[str, Any], None] = None,
                 schedule: Optional[Dict[str, Any]] = None, clip: Optional[Dict[str, Any]] = None,
                 api_key: Optional[str] = None, dtype: Optional[str] = None,
                 mode: Optional[Dict[str, Any]] = None, metadata: Optional[Dict[str, Any]] = None,
                 client: Optional[Client] = None, timeout: float = 60.0,
                 retries: int = RETRIES) -> None:
        super().__init__(params, {})
        for group in self.param_groups:
            extra = sorted(k for k in group if k != "params")
            if extra:
                raise ValueError("per-group options (%s) are not supported: the session's "
                                 "optimizer config applies to every parameter"
                                 % ", ".join(extra))
        self._params = [p for g in self.param_groups for p in g["params"]]
        if dtype is None:
            every64 = all(p.dtype == torch.float64 for p in self._params)
            dtype = "float64" if every64 else "float32"
        _vec.check_dtype(dtype)
        self._dtype = _TORCH_DTYPES[dtype]
        self._numel = [p.numel() for p in self._params]
        if optimizer is None:
            raise ValueError('optimizer is required, e.g. {"type": "adam", "lr": 1e-3}')
        self.client = client if client is not None else Client(
            url, api_key=api_key, timeout=timeout, retries=retries)
        with torch.no_grad():
            init = self._flatten([p for p in self._params])
        self.session = self.client.create_session(
            session, optimizer, params=init, dtype=dtype, schedule=schedule, clip=clip,
            mode=mode, metadata=metadata)
        if self.session.size != sum(self._numel):
            raise ValueError("session %s has %d params; the model has %d"
                             % (session, self.session.size, sum(self._numel)))
        if not self.session.created:
            self._load(self.session.params())

    @property
    def last_step(self):
        """Updates the session has applied, as of the last answer."""
        return self.session.last_step

    @property
    def last_lr(self):
        """The learning rate the last update used (None if it applied nothing)."""
        return self.session.last_lr

    def _flatten(self, tensors):
        """One CPU vector of the session dtype, in the form the client sends."""
        flat = torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=self._dtype)
                          for t in tensors])
        return flat.numpy() if _vec.numpy_available() else flat.tolist()

    def _load(self, vec):
        """Copies a params vector from the daemon into the tensors, in place."""
        if _vec.numpy_available() and not hasattr(vec, "typecode"):
            flat = torch.from_numpy(vec)
        else:
            flat = torch.tensor(list(vec), dtype=self._dtype)
        off = 0
        with torch.no_grad():
            for p, n in zip(self._params, self._numel):
                p.copy_(flat[off:off + n].view_as(p))
                off += n

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Sends the gradients, applies the answer; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = []
        for p in self._params:
            if p.grad is None:
                grads.append(torch.zeros(p.numel(), dtype=self._dtype))
            elif p.grad.is_sparse:
                raise RuntimeError("RemoteOptimizer does not take sparse gradients")
            else:
                grads.append(p.grad)
        new = self.session.step(self._flatten(grads),
                                loss=None if loss is None else float(loss))
        self._load(new)
        return loss
