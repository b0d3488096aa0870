"""Argument checks shared by the entry points, engines, aggregators, solvers, weightings and
optimizers (not public). Each argument of a public call is checked once, by its entry point.

Each raises ``ValueError`` with the message "{who}: {name} must be ..., got {value!r}" (no
"{who}: " prefix when ``who`` is None) and returns the checked value. Booleans are not
accepted as numbers (but see ``check_number``'s ``bool_ok``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["ENGINES", "MATRIX_ENGINES", "check_aggregator", "check_bool", "check_choice",
           "check_engine", "check_engine_name", "check_features", "check_finite_losses",
           "check_generator", "check_int", "check_losses_list", "check_number", "check_seed",
           "check_shared_params", "check_task_grads", "checking_values", "generator_state",
           "load_generator_state"]

ENGINES = ("auto", "loop", "vmap", "stream")  # the per-task gradient engines, by name
MATRIX_ENGINES = ("auto", "loop", "vmap")      # those that form G (T, N): ``TaskGradients``


def _fail(who: str | None, name: str, what: str, value: object) -> ValueError:
    prefix = "" if who is None else f"{who}: "
    return ValueError(f"{prefix}{name} must be {what}, got {value!r}")


def check_int(name: str, value: object, low: int = 1, *, who: str | None = None,
              none_ok: bool = False) -> int | None:
    """An ``int`` (not a bool) >= ``low`` ("an integer >= low"); also None if ``none_ok``."""
    if none_ok and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = f"an integer >= {low}"
        raise _fail(who, name, f"None or {what}" if none_ok else what, value)
    return value


def check_number(name: str, value: object, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 who: str | None = None, none_ok: bool = False,
                 bool_ok: bool = False) -> float | None:
    """A finite int or float within the bounds, as ``float`` (None too if ``none_ok``; a bool
    only if ``bool_ok``: the simplex solvers' ``tol`` has always taken one). The message names
    the bounds as given: "a finite number >= 0" / "> 0" with one bound, "a number in (0, 1)" /
    "[0, 1]" / "[0, 1)" with two (``low``/``high`` are formatted as passed: 0 and 0.0 differ)."""
    if none_ok and value is None:
        return None
    ok = ((bool_ok or not isinstance(value, bool)) and isinstance(value, (int, float))
          and math.isfinite(value)
          and (low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        if high is None:
            what = "a finite number" if low is None else \
                f"a finite number {'>' if low_open else '>='} {low}"
        elif low is None:
            what = f"a finite number {'<' if high_open else '<='} {high}"
        else:
            what = (f"a number in {'(' if low_open else '['}{low}, "
                    f"{high}{')' if high_open else ']'}")
        raise _fail(who, name, f"None or {what}" if none_ok else what, value)
    return float(value)  # type: ignore[arg-type]


def check_bool(name: str, value: object, *, who: str | None = None) -> bool:
    """A ``bool`` ("a bool")."""
    if not isinstance(value, bool):
        raise _fail(who, name, "a bool", value)
    return value


def check_choice(name: str, value: object, choices: Collection[object], *,
                 who: str | None = None) -> object:
    """One of ``choices`` ("one of {choices}")."""
    if value not in choices:
        raise _fail(who, name, f"one of {choices}", value)
    return value


def check_seed(seed: object) -> int:
    """A seed: a non-negative int, or None for one drawn from torch's global CPU RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _fail(None, "seed", "a non-negative integer or None", seed)
    return seed


def checking_values(check: bool | None, t: Tensor) -> bool:
    """Whether to read input values back: ``check`` when given, else only for CPU tensors that
    are not being traced by ``torch.compile`` (on CUDA a read-back is a host sync)."""
    if check is not None:
        return check
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_task_grads(task_grads: object, params: Sequence[Tensor], T: int, *,
                     names: Sequence[str] | None = None, who: str | None = None,
                     kind: str = "shared") -> list[Tensor | None]:
    """Per-task gradients (T, *p.shape) for each of ``params``, from a list in their order or
    a dict keyed by parameter (missing keys and ``None`` entries give None): floating, the
    right shape, on the parameter's device. ``kind`` names the parameters in messages."""
    prefix = "" if who is None else f"{who}: "
    names = [str(k) for k in range(len(params))] if names is None else names
    if isinstance(task_grads, Mapping):
        by_id = {id(p): g for p, g in task_grads.items()}
        if set(by_id) - {id(p) for p in params}:
            raise ValueError(f"{prefix}task_grads has keys that are not {kind} parameters")
        items = [by_id.get(id(p)) for p in params]
    elif isinstance(task_grads, Sequence) and not isinstance(task_grads, Tensor | str):
        if len(task_grads) != len(params):
            raise ValueError(f"{prefix}task_grads has {len(task_grads)} entries for "
                             f"{len(params)} {kind} parameters")
        items = list(task_grads)
    else:
        raise TypeError(f"{prefix}task_grads must be a list (in {kind}-parameter order) or a "
                        f"dict keyed by parameter, got {type(task_grads).__name__}")
    for g, p, name in zip(items, params, names):
        if g is None:
            continue
        if not isinstance(g, Tensor) or not g.is_floating_point():
            raise TypeError(f"{prefix}task_grads for {name!r} must be a floating tensor, "
                            f"got {type(g).__name__}")
        if tuple(g.shape) != (T, *p.shape):
            raise ValueError(f"{prefix}task_grads for {name!r} must have shape "
                             f"{(T, *p.shape)}, got {tuple(g.shape)}")
        if g.device != p.device:
            raise ValueError(f"{prefix}task_grads for {name!r} is on {g.device} but its "
                             f"parameter is on {p.device}")
    return items


def check_generator(generator: object, who: str | None = None) -> torch.Generator | None:
    """A ``torch.Generator`` or None (``TypeError`` otherwise)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        prefix = "" if who is None else f"{who}: "
        raise TypeError(f"{prefix}generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    return generator


def generator_state(generator: torch.Generator | None) -> Tensor | None:
    """The generator's state for a ``state_dict`` (None without a generator)."""
    return None if generator is None else generator.get_state()


def load_generator_state(generator: torch.Generator | None, state: Tensor | None,
                         who: str) -> None:
    """Restore ``generator_state``'s result (a state for no generator is a ``ValueError``)."""
    if state is None:
        return
    if generator is None:
        raise ValueError(f"{who}.load_state_dict: the state holds a generator state but this "
                         f"{who} has no generator")
    generator.set_state(state)


def check_finite_losses(losses: Sequence[Tensor] | Tensor) -> None:
    """``ValueError`` naming the task indices of non-finite losses (reads them on the host:
    one synchronisation on CUDA)."""
    values = (losses.detach() if isinstance(losses, Tensor)
              else torch.stack([loss.detach().reshape(()) for loss in losses]))
    values = values.to(torch.float64)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise ValueError(f"non-finite losses at task indices {bad}: {values[bad].tolist()}")


def check_engine_name(engine: object, who: str | None = None) -> str:
    """An engine name: one of ``ENGINES``; with ``who`` (a method that needs the per-task
    gradients G themselves, not only K), one of ``MATRIX_ENGINES``."""
    allowed = ENGINES if who is None else MATRIX_ENGINES
    if not isinstance(engine, str):
        raise TypeError(f"engine must be one of {allowed}, got {type(engine).__name__}")
    if engine not in allowed:
        if engine in ENGINES:
            raise ValueError(f"{who} needs the per-task gradients G (T, N) themselves, which "
                             f"engine={engine!r} never forms (it folds them into K as they "
                             f"come): use one of {allowed}")
        raise ValueError(f"unknown engine {engine!r}; expected one of {allowed}")
    return engine


def check_losses_list(losses: object) -> list[Tensor]:
    """Validate T >= 1 scalar floating losses that require grad, all on one device.

    ``losses`` is a sequence of one-element tensors or a 1-D tensor (its entries are the
    losses). Returns them as a list of 0-d tensors (``reshape(())`` views).
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError("losses given as one tensor must be 1-D (one entry per task), "
                             f"got shape {tuple(losses.shape)}")
        losses = list(losses.unbind(0))
    elif isinstance(losses, Iterable) and not isinstance(losses, str | bytes):
        losses = list(losses)
    else:
        raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}")
    if not losses:
        raise ValueError("losses is empty: need at least one task loss")
    out = []
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"losses[{i}] must be a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"losses[{i}] must be a scalar (one element), "
                             f"got shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise TypeError(f"losses[{i}] must be floating point, got {loss.dtype}")
        if not loss.requires_grad:
            raise ValueError(f"losses[{i}] does not require grad: it is not connected to any "
                             "parameter (computed under no_grad, or detached?)")
        out.append(loss.reshape(()))
    devices = {loss.device for loss in out}
    if len(devices) > 1:
        raise ValueError(f"losses are on different devices: {sorted(map(str, devices))}")
    return out


def check_shared_params(params: object) -> list[Tensor]:
    """Validate a non-empty collection of distinct leaf tensors that require grad."""
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, Iterable) and not isinstance(params, str | bytes):
        params = list(params)
    else:
        raise TypeError("shared_params must be an iterable of tensors, "
                        f"got {type(params).__name__}")
    if not params:
        raise ValueError("shared_params is empty: need at least one shared parameter")
    seen: dict[int, int] = {}
    for k, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_params[{k}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"shared_params[{k}] (shape {tuple(p.shape)}) does not require grad")
        if not p.is_leaf:
            raise ValueError(f"shared_params[{k}] (shape {tuple(p.shape)}) is not a leaf tensor: "
                             "pass parameters, not results of operations on them")
        if id(p) in seen:
            raise ValueError(f"shared_params[{k}] is the same tensor as "
                             f"shared_params[{seen[id(p)]}]: duplicates are not allowed")
        seen[id(p)] = k
    return params


def check_features(features: object) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.requires_grad:
        raise ValueError("features does not require grad: pass the shared representation z "
                         "as computed by the encoder (not detached)")
    if not features.is_floating_point() or features.numel() == 0:
        raise ValueError(f"features must be a non-empty floating tensor, got {features.dtype} "
                         f"of shape {tuple(features.shape)}")
    return features


def check_engine(engine: object) -> object:
    """An engine name (``check_engine_name``) or an engine object (``TaskGradients``,
    ``StreamGradients``, ``LatentGradients``: any ``fastmtl.engine.GradientEngine``)."""
    from fastmtl.engine.base import GradientEngine

    if isinstance(engine, str):
        return check_engine_name(engine)
    if not isinstance(engine, GradientEngine):
        raise TypeError(f"engine must be one of {ENGINES} or a fastmtl.engine object "
                        f"(TaskGradients, StreamGradients, LatentGradients), got "
                        f"{type(engine).__name__}")
    return engine


def check_aggregator(aggregator: object, name: str = "aggregator") -> object:
    """A ``fastmtl.aggregators.Aggregator`` (write your own by subclassing it and implementing
    ``_weights(K, losses)``). Anything else is a ``TypeError`` before any backward pass; a loss
    weighting and a torchjd aggregator get a message saying how to use them instead."""
    from fastmtl.aggregators.base import Aggregator

    if isinstance(aggregator, Aggregator):
        return aggregator
    kind = type(aggregator)
    module = getattr(kind, "__module__", "") or ""
    got = f"got {kind.__name__}"
    if module.startswith("fastmtl.weighting"):
        raise TypeError(
            f"{name} must be a fastmtl.aggregators.Aggregator, {got}, a loss weighting: it "
            "weighs the losses, not their gradients. Use it as `weighting(losses).backward()` "
            "(see its docstring), or pass an aggregator such as fm.aggregators.MGDA()")
    if module.split(".")[0] == "torchjd":
        raise TypeError(
            f"{name} must be a fastmtl.aggregators.Aggregator, {got} from torchjd: use the "
            f"fastmtl aggregator of the same name (fm.aggregators.{kind.__name__}())")
    raise TypeError(f"{name} must be a fastmtl.aggregators.Aggregator (subclass it and "
                    f"implement _weights(K, losses) for a method of your own), {got}")
