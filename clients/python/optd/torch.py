"""optd.torch -- a torch.optim.Optimizer whose updates optd applies.

    from optd.torch import RemoteOptimizer
    opt = RemoteOptimizer(model.named_parameters(), "adamw", lr=1e-3,
                          session="mlp", url="http://127.0.0.1:8080")
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

It takes what torch.optim.<Name> takes (tensors, (name, tensor) pairs from
named_parameters(), or param-group dicts with per-group options) with
torch's defaults, and works with torch's LR schedulers and state_dict().

How torch's notions map onto a session:
  * every parameter tensor is one of the session's named tensors (the flat
    vector is their concatenation, in param-group order); every param group
    is one of its groups, with its hyperparameters;
  * a tensor whose .grad is None is sent as absent: the daemon leaves its
    params, buffers and step count alone, as torch does;
  * a group's lr, momentum and betas[0] -- what schedulers change -- go
    with the step that first uses a changed value; any other hyperparameter
    changed in a param group is PATCHed into the session before the step;
  * state, state_dict() and load_state_dict() go through the daemon's
    state export (GET / PUT .../state), translated to and from torch's own
    per-parameter state (its keys and types, learnt from a one-parameter
    torch optimizer of the same kind).

The base package never imports torch; only importing this module does.
"""

import inspect
import json
import os
import re
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch.optim.optimizer import required as _REQUIRED

from . import _safetensors, _vec
from ._constants import RETRIES
from .client import Client

__all__ = ["RemoteOptimizer"]

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_ST_DTYPES = {"F32": torch.float32, "F64": torch.float64}
_ST_NAMES = {torch.float32: "F32", torch.float64: "F64"}

#: optd optimizer type -> torch.optim class name
TORCH_CLASSES = {
    "sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
    "adamw": "AdamW", "adamax": "Adamax", "adadelta": "Adadelta", "nadam": "NAdam",
    "radam": "RAdam", "asgd": "ASGD", "rprop": "Rprop",
}
#: The hyperparameters a step carries (what schedulers change).
_STEP_KEYS = ("lr", "momentum", "betas")
#: Tensor names the daemon accepts.
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")


def _plain(v):
    """A hyperparameter value as JSON wants it (tuples become lists)."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _same(a, b):
    return _plain(a) == _plain(b)


class _Template:
    """What torch keeps per parameter for one group's options: the keys of
    state[p] and their kinds, learnt from a one-parameter torch optimizer of
    the same class, before and after one step.

    kinds: "step" (with a maker of torch's type for it), "buffer" (a tensor
    shaped like the param), "scalar" (a 0-dim tensor or a number), "none"
    (torch stores None, e.g. SGD's momentum_buffer without momentum)."""

    def __init__(self, cls, options, dtype):
        p = torch.zeros(2, dtype=dtype, requires_grad=True)
        opt = cls([p], **options)
        #: torch creates the state before the first step (Adagrad)
        self.eager = bool(opt.state.get(p))
        p.grad = torch.ones_like(p)
        opt.step()
        self.kinds = {}
        self.makers = {}
        for key, value in opt.state[p].items():
            if key == "step":
                self.kinds[key] = "step"
                if isinstance(value, torch.Tensor):
                    shape, vdtype = value.shape, value.dtype
                    self.makers[key] = (lambda s, shape=shape, vdtype=vdtype:
                                        torch.full(shape, float(s), dtype=vdtype))
                else:
                    kind = type(value)
                    self.makers[key] = lambda s, kind=kind: kind(s)
            elif value is None:
                self.kinds[key] = "none"
            elif isinstance(value, torch.Tensor) and value.shape == p.shape:
                self.kinds[key] = "buffer"
            elif isinstance(value, torch.Tensor) and value.dim() == 0:
                self.kinds[key] = "scalar"
                vdtype = value.dtype
                self.makers[key] = lambda x, vdtype=vdtype: torch.tensor(x, dtype=vdtype)
            elif isinstance(value, (int, float)):
                self.kinds[key] = "scalar"
                kind = type(value)
                self.makers[key] = lambda x, kind=kind: kind(x)
            else:
                raise TypeError("torch.optim.%s keeps %s = %r per parameter, which optd "
                                "cannot translate" % (cls.__name__, key, type(value)))


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose updates the optd daemon applies.

    ``params``: what torch.optim.<Name> accepts -- an iterable of tensors,
    of (name, tensor) pairs (``model.named_parameters()``: the names become
    the session's tensor names; others are called p0, p1, ...), or of
    param-group dicts with per-group options.  ``optimizer``: the optd type
    ("adamw", "sgd", ...; each is torch.optim's class of that name) or
    {"type": "adamw", ...}; further keyword arguments are the torch
    optimizer's (lr=..., betas=..., momentum=..., nesterov=...), checked and
    defaulted by torch itself.

    ``session``: the session name (a fresh random one when None).  An
    existing session of that name and config is resumed: its params are
    copied into the tensors.  ``schedule``, ``clip``, ``mode``, ``metadata``:
    as in Client.create_session (a server-side schedule excludes torch
    schedulers: the daemon answers 409).  ``dtype``: "float32" or "float64";
    by default float64 when every parameter is float64.  Give ``client`` to
    share an optd.Client, else one is made from ``url``, ``api_key``,
    ``timeout`` and ``retries``.
    """

    def __init__(self, params: Iterable[Any], optimizer: Union[str, Dict[str, Any]] = "adamw",
                 *, session: Optional[str] = None, url: str = "http://127.0.0.1:8080",
                 client: Optional[Client] = None, api_key: Optional[str] = None,
                 dtype: Optional[str] = None, schedule: Optional[Dict[str, Any]] = None,
                 clip: Optional[Dict[str, Any]] = None, mode: Optional[Dict[str, Any]] = None,
                 metadata: Optional[Dict[str, Any]] = None, timeout: float = 60.0,
                 retries: int = RETRIES, **kwargs: Any) -> None:
        cfg = {"type": optimizer} if isinstance(optimizer, str) else dict(optimizer or {})
        kind = str(cfg.pop("type", "")).lower()
        if kind not in TORCH_CLASSES:
            raise ValueError("optimizer %r has no torch.optim class; RemoteOptimizer takes %s"
                             % (kind, ", ".join(sorted(TORCH_CLASSES))))
        for k, v in kwargs.items():
            if k in cfg and not _same(cfg[k], v):
                raise ValueError("%s is given twice: %r in optimizer, %r as an argument"
                                 % (k, cfg[k], v))
        cfg.update(kwargs)
        self.kind = kind
        self._torch_cls = getattr(torch.optim, TORCH_CLASSES[kind])
        self.client = client if client is not None else Client(
            url, api_key=api_key, timeout=timeout, retries=retries)
        self._hp_names = self._catalogue_names()
        accepted = set(inspect.signature(self._torch_cls.__init__).parameters) - {"self", "params"}
        torch_kwargs = {k: v for k, v in cfg.items() if k in accepted}
        # optd's own hyperparameters (momentum_form, ...) go to the session
        # config alone; anything else is as wrong as it is for torch.
        self._optd_only = {k: v for k, v in cfg.items() if k not in accepted}
        unknown = sorted(k for k in self._optd_only if k not in self._hp_names)
        if unknown:
            raise TypeError("%s got unexpected keyword argument(s): %s"
                            % (self._torch_cls.__name__, ", ".join(unknown)))
        # torch checks and fills the defaults, exactly as torch.optim would.
        proto = self._torch_cls([torch.zeros(1, requires_grad=True)], **torch_kwargs)

        groups, names = self._split_params(params)
        self._layout_fixed = False
        super().__init__(groups, dict(proto.defaults))
        self._layout_fixed = True
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._names = self._name_tensors(names)
        if dtype is None:
            every64 = all(p.dtype == torch.float64 for p in self._params)
            dtype = "float64" if every64 else "float32"
        _vec.check_dtype(dtype)
        self._dtype = _TORCH_DTYPES[dtype]
        self._numel = [p.numel() for p in self._params]
        self._templates: Dict[str, _Template] = {}
        self._state_cache = None

        if session is None:
            session = "torch-" + os.urandom(8).hex()
        config, group_docs = self._session_config()
        with torch.no_grad():
            init = self._flatten(self._params)
        self.session = self.client.create_session(
            session, config, params=init, dtype=dtype, schedule=schedule, clip=clip,
            mode=mode, metadata=metadata,
            tensors=[{"name": n, "shape": list(p.shape)} for n, p in zip(self._names, self._params)],
            groups=group_docs)
        if self.session.size != sum(self._numel):
            raise ValueError("session %s has %d params; the model has %d"
                             % (session, self.session.size, sum(self._numel)))
        self._known = self._daemon_values(self.session.groups)
        if not self.session.created:
            self._load(self.session.params())

    # ------------------------------------------------------------ layout

    @staticmethod
    def _split_params(params):
        """torch's param groups, with (name, tensor) pairs replaced by the
        tensor; returns (groups, {id(tensor): name})."""
        if isinstance(params, torch.Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            "Tensors or dicts, but got " + torch.typename(params))
        items = list(params)
        if not items:
            raise ValueError("optimizer got an empty parameter list")
        groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
        names = {}
        for g in groups:
            if "params" not in g:
                raise ValueError("a param group needs 'params'")
            ps = g["params"]
            if isinstance(ps, torch.Tensor):
                ps = [ps]
            elif isinstance(ps, set):
                raise TypeError("optimizer parameters need to be organized in ordered "
                                "collections, but the ordering of tensors in sets will change "
                                "between runs. Please use a list instead.")
            out = []
            for item in ps:
                if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                        and isinstance(item[1], torch.Tensor)):
                    names[id(item[1])] = item[0]
                    item = item[1]
                out.append(item)
            g["params"] = out
        return groups, names

    def _name_tensors(self, names):
        out = []
        for i, p in enumerate(self._params):
            name = names.get(id(p), "p%d" % i)
            if not _TENSOR_NAME.match(name):
                raise ValueError("tensor name %r: names are 1-200 characters of "
                                 "A-Z a-z 0-9 _ . : / -" % (name,))
            out.append(name)
        if len(set(out)) != len(out):
            dup = sorted({n for n in out if out.count(n) > 1})
            raise ValueError("tensor names must be unique: %s" % ", ".join(dup))
        return out

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """As torch's while constructing; afterwards refused: a session's
        tensor layout is fixed when it is created (this daemon version has
        no call that extends it).  Make a new RemoteOptimizer (and session)
        with every group instead."""
        if getattr(self, "_layout_fixed", False):
            raise RuntimeError(
                "RemoteOptimizer.add_param_group: session %s has a fixed tensor layout and "
                "the optd daemon cannot add tensors to it; create a new RemoteOptimizer "
                "(with a new session name) holding every param group instead"
                % self.session.name)
        super().add_param_group(param_group)

    def _catalogue_names(self):
        """The hyperparameter names optd knows for this optimizer type."""
        for entry in self.client.optimizers().get("optimizers", []):
            if entry.get("type") == self.kind:
                return [h["name"] for h in entry.get("hyperparameters", [])]
        raise ValueError("the daemon has no optimizer %r" % self.kind)

    def _group_hparams(self, group):
        """A group's hyperparameters that optd knows, JSON-ready."""
        return {k: _plain(group[k]) for k in self._hp_names if k in group}

    def _session_config(self):
        """The session's optimizer config (torch's defaults, or group 0's
        value for a default torch leaves required) and each group's doc
        (its tensors and the hyperparameters that differ)."""
        first = self._group_hparams(self.param_groups[0])
        config = {"type": self.kind}
        for k in self._hp_names:
            if k in self.defaults:
                v = self.defaults[k]
                config[k] = first[k] if v is _REQUIRED else _plain(v)
        config.update(self._optd_only)
        docs = []
        offset = 0
        for g in self.param_groups:
            n = len(g["params"])
            doc = {"tensors": self._names[offset:offset + n]}
            offset += n
            for k, v in self._group_hparams(g).items():
                if not _same(v, config.get(k)):
                    doc[k] = v
            docs.append(doc)
        return config, docs

    def _daemon_values(self, docs):
        """Each group's hyperparameters as the daemon has them (from the
        session document), else as this optimizer's groups have them."""
        out = []
        for i, g in enumerate(self.param_groups):
            known = self._group_hparams(g)
            if docs and i < len(docs):
                known.update({k: _plain(v) for k, v in docs[i].get("optimizer", {}).items()
                              if k in known})
                if docs[i].get("lr") is not None:
                    known["lr"] = docs[i]["lr"]
            out.append(known)
        return out

    # ------------------------------------------------------------ vectors

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

    # ------------------------------------------------------------ step

    def _sync_hparams(self):
        """PATCHes the hyperparameters (other than lr, momentum, betas[0])
        that changed in param_groups since the daemon last saw them; returns
        the per-group values the step must carry (None when none changed)."""
        patch = [{} for _ in self.param_groups]
        for i, g in enumerate(self.param_groups):
            now, known = self._group_hparams(g), self._known[i]
            for k, v in now.items():
                if k in ("lr", "momentum"):
                    continue
                if k == "betas":
                    if v[1:] != known[k][1:]:
                        patch[i][k] = v
                elif not _same(v, known.get(k)):
                    patch[i][k] = v
        if any(patch):
            self.session.update(groups=patch)
            for i, p in enumerate(patch):
                self._known[i].update(p)
        carry = {}
        for k in _STEP_KEYS:
            vals = [self._group_hparams(g).get(k) for g in self.param_groups]
            if any(v is None for v in vals):
                continue
            if k == "betas":
                changed = any(v[0] != known[k][0] for v, known in zip(vals, self._known))
            else:
                changed = any(v != known.get(k) for v, known in zip(vals, self._known))
            if changed:
                carry[k] = vals
        if not carry:
            return None, None
        wire = {"lr": "lr", "momentum": "momentum", "betas": "beta1"}
        groups = [{wire[k]: (carry[k][i][0] if k == "betas" else carry[k][i]) for k in carry}
                  for i in range(len(self.param_groups))]
        return groups, carry

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Sends the present gradients (tensors whose .grad is None are
        absent: left alone, as torch leaves them) with each group's changed
        hyperparameters, and copies the new params back in place.  Returns
        the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads, absent = [], []
        for i, p in enumerate(self._params):
            if p.grad is None:
                absent.append(i)
            elif p.grad.is_sparse:
                raise RuntimeError("RemoteOptimizer does not take sparse gradients")
            else:
                grads.append(p.grad)
        if not grads:
            return loss                 # torch: no gradient, nothing changes
        groups, carry = self._sync_hparams()
        new = self.session.step(self._flatten(grads), absent=absent or None, groups=groups,
                                loss=None if loss is None else float(loss))
        if carry:
            for i, known in enumerate(self._known):
                for k, vals in carry.items():
                    known[k] = vals[i]
        self._state_cache = None
        self._load(new)
        return loss

    # ------------------------------------------------------------ state

    def _template(self, group):
        """The _Template for a group's options (cached by their values)."""
        accepted = set(inspect.signature(self._torch_cls.__init__).parameters) - {"self", "params"}
        options = {k: v for k, v in group.items() if k in accepted}
        # What torch keeps depends on the switches (amsgrad, centered, ...)
        # and on whether a number is 0 (SGD's momentum), not on the values
        # schedulers move: one template per shape of state.
        key = json.dumps({k: (v != 0) if isinstance(v, (int, float)) and not isinstance(v, bool)
                          else _plain(v) for k, v in options.items()},
                         sort_keys=True, default=str)
        if key not in self._templates:
            self._templates[key] = _Template(self._torch_cls, options, self._dtype)
        return self._templates[key]

    def _export(self):
        """The daemon's state export: (tensors, metadata, optd.state)."""
        tensors, meta = _safetensors.loads(self.session.state())
        if meta.get("optd.format") != "1":
            raise RuntimeError("state export of format %r; this client reads format 1"
                               % meta.get("optd.format"))
        return tensors, meta, json.loads(meta.get("optd.state", "{}"))

    def _torch_states(self):
        """{tensor index: torch's state[p] dict} from the daemon's export."""
        tensors, _, st = self._export()
        steps = st.get("steps", {})
        scalars = st.get("scalars", {})
        minit = st.get("momentum_initialized", {})
        out = {}
        tensor_group = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        for i, (name, p) in enumerate(zip(self._names, self._params)):
            tmpl = self._template(self.param_groups[tensor_group[i]])
            step = int(steps.get(name, 0))
            if step == 0 and not tmpl.eager:
                continue                        # torch has no state[p] yet
            entry = {}
            for key, kind in tmpl.kinds.items():
                if kind == "step":
                    entry[key] = tmpl.makers[key](step)
                elif kind == "none":
                    entry[key] = None
                elif kind == "scalar":
                    entry[key] = tmpl.makers[key](float(scalars.get(name, {}).get(key, 0.0)))
                elif key == "momentum_buffer" and minit.get(name) is False:
                    entry[key] = None
                elif "%s.%s" % (name, key) in tensors:
                    dt, shape, data = tensors["%s.%s" % (name, key)]
                    t = torch.frombuffer(bytearray(data), dtype=_ST_DTYPES[dt])
                    entry[key] = t.reshape(p.shape).to(p.dtype)
                else:
                    entry[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out[i] = entry
        return out

    @property
    def state(self):
        """torch's per-parameter state (a dict keyed by the tensors), read
        from the daemon (once per step)."""
        if not getattr(self, "_layout_fixed", False) or not hasattr(self, "session"):
            return defaultdict(dict)
        if self._state_cache is None:
            states = self._torch_states()
            cache = defaultdict(dict)
            for i, entry in states.items():
                cache[self._params[i]] = entry
            self._state_cache = cache
        return self._state_cache

    @state.setter
    def state(self, value):
        # torch.optim.Optimizer.__init__ assigns an empty state; the real
        # one lives in the daemon.
        pass

    def state_dict(self) -> Dict[str, Any]:
        """torch's format: {"state": {index: {...}}, "param_groups": [...]},
        which torch.optim.<Name>.load_state_dict takes."""
        states = self._torch_states()
        groups = []
        index = 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            groups.append(packed)
        return {"state": states, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a torch optimizer's state_dict (or this class's): the
        param groups' options, and per tensor its buffers and step, into
        the daemon, with the tensors' current values as params."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"])
               for g, s in zip(self.param_groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't "
                             "match the size of optimizer's group")
        saved_ids = [i for s in saved_groups for i in s["params"]]
        saved_state = state_dict["state"]
        tensors, meta, st = self._export()
        steps, scalars = st.get("steps", {}), st.get("scalars", {})
        minit = st.get("momentum_initialized", {})
        session_step = int(st.get("step", 0))
        has_step = "step" in self._template(self.param_groups[0]).kinds
        names_set = set(self._names)
        with torch.no_grad():
            for i, (name, p) in enumerate(zip(self._names, self._params)):
                entry = saved_state.get(saved_ids[i])
                dt, shape, _ = tensors[name]
                tensors[name] = (dt, shape, self._st_bytes(p, dt))
                for tname in list(tensors):
                    key = tname[len(name) + 1:]
                    if (not tname.startswith(name + ".") or "." in key
                            or tname in names_set):
                        continue                # another tensor, or its buffer
                    bdt, bshape, _ = tensors[tname]
                    value = entry.get(key) if entry else None
                    if isinstance(value, torch.Tensor) and value.numel() == p.numel():
                        tensors[tname] = (bdt, bshape, self._st_bytes(value, bdt))
                    else:
                        tensors[tname] = (bdt, bshape, bytes(len(tensors[tname][2])))
                for key, value in (entry or {}).items():
                    # a buffer torch has and the export lacks (not created yet)
                    tname = "%s.%s" % (name, key)
                    if (key != "step" and tname not in tensors and isinstance(value, torch.Tensor)
                            and value.dim() > 0 and value.numel() == p.numel()):
                        tensors[tname] = (dt, shape, self._st_bytes(value, dt))
                if not entry:
                    steps[name] = 0
                    if name in minit:
                        minit[name] = False
                    continue
                if "step" in entry:
                    steps[name] = int(float(entry["step"]))
                elif not has_step:
                    # torch keeps no step for this optimizer (SGD): the
                    # tensor has been stepped, at least once.
                    steps[name] = max(1, session_step)
                for key, value in entry.items():
                    if key == "step" or value is None:
                        continue
                    if isinstance(value, (int, float)) or (
                            isinstance(value, torch.Tensor) and value.dim() == 0):
                        scalars.setdefault(name, {})[key] = float(value)
                if name in minit:
                    minit[name] = entry.get("momentum_buffer") is not None
        st["steps"] = steps
        st["scalars"] = scalars
        if minit:
            st["momentum_initialized"] = minit
        st["step"] = max([session_step] + [int(s) for s in steps.values()])
        new_groups = []
        for g, s in zip(self.param_groups, saved_groups):
            ng = dict(s)
            ng["params"] = g["params"]
            new_groups.append(ng)
        self.param_groups[:] = new_groups       # torch's groups, the saved options
        st["groups"] = [{k: _plain(g[k]) for k in _STEP_KEYS if k in g} for g in new_groups]
        meta = dict(meta)
        meta["optd.state"] = json.dumps(st, separators=(",", ":"))
        doc = self.session.load_state(_safetensors.dumps(tensors, meta))
        self._known = self._daemon_values(doc.get("groups"))
        self._state_cache = None
        # What differs from the daemon's groups is PATCHed now, except lr,
        # momentum and betas[0], which the next step carries.
        self._sync_hparams()

    @staticmethod
    def _st_bytes(t, st_dtype):
        """A tensor's raw little-endian bytes in a safetensors dtype."""
        flat = t.detach().reshape(-1).to(device="cpu", dtype=_ST_DTYPES[st_dtype]).contiguous()
        return flat.numpy().tobytes() if _vec.numpy_available() else bytes(
            flat.view(torch.uint8).tolist())
