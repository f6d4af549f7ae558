"""Attach auxiliary heads to named layers of any ``nn.Module``, without editing its code.

A *tap* reads the output of one submodule (addressed by its qualified name, as in ``model.named_modules()``)
through a forward hook, optionally picks a part of it with a selector (an LSTM returns ``(out, (h, c))``),
and feeds it to a head. :func:`attach` returns an :class:`AuxModel` whose forward gives an explicit
:class:`Outputs` object, in train and eval mode alike, and whose :meth:`AuxModel.strip` hands back the
original model with every hook removed for deployment.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from auxloss._representations import Representations, TapRepresentation, keep_tap
from auxloss.errors import AuxLossError, close_matches

__all__ = ["AuxModel", "Call", "LayerInfo", "Outputs", "Tap", "attach", "emit", "list_layers", "select"]


class _EmitSinks(threading.local):
    """The emitted-loss collectors of the AuxModel forwards running in *this thread*, innermost last.

    Each :meth:`AuxModel.forward` pushes a dict it owns and pops it in a ``finally``, so the stack is empty
    between forwards and a loss goes to the innermost model whose forward is running in the emitting thread;
    another thread (a second model, a ``DataParallel`` replica) has its own stack and never sees it. A
    thread-local rather than a ``ContextVar``: TorchDynamo cannot trace ``ContextVar.get/set`` (a graph break,
    which ``torch.compile(fullgraph=True)`` refuses), while it traces this. A forward holds no ``await``, so
    per-thread and per-context are the same thing here.
    """

    def __init__(self) -> None:
        self.stack: list[dict[str, Any]] = []


_SINKS = _EmitSinks()


def emit(name: str, loss: Any) -> None:
    """Contribute a named auxiliary loss from inside any module's forward (a router's load-balancing loss...).

    The :class:`AuxModel` whose forward is running in the calling thread collects it into
    ``Outputs.losses[name]`` (the innermost one, when AuxModels are nested); a task with ``source="loss:<name>"``
    (see :meth:`auxloss.Task.emitted`) then weights, schedules and reports it like every other auxiliary loss.
    Several emits under one name (one per layer of a deep MoE) are summed. Outside an AuxModel's forward (a
    stripped model in deployment, or a thread that runs no AuxModel forward) ``emit`` does nothing, so modules
    can always call it.
    """
    stack = _SINKS.stack
    if not stack:
        return
    if not isinstance(name, str) or not name:
        raise AuxLossError(f"emit() needs a non-empty loss name, got {name!r}.")
    sink = stack[-1]
    sink[name] = sink[name] + loss if name in sink else loss


#: A selector picks the tensor a head reads out of a layer's output: an index into a tuple/list, a key into a
#: dict, a tuple of those applied in turn (``(1, 0)`` is ``h`` of an LSTM's ``(out, (h, c))``), or a callable.
Selector = int | str | tuple | Callable[[Any], Tensor] | None


@dataclasses.dataclass
class Outputs:
    """What an :class:`AuxModel` returns: the main output and every head's output, by tap name.

    An explicit type rather than GoogLeNet's tuple-in-training, tensor-in-eval habit, so that a loop never has to
    guess which mode produced what. It is a dataclass, so DDP finds the tensors inside it.
    """

    main: Any
    aux: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Auxiliary losses the model computed itself during forward (:func:`emit`, or a Hugging Face ``aux_loss``).
    losses: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        """``outputs["main"]`` or ``outputs[tap_name]``."""
        if name == "main":
            return self.main
        try:
            return self.aux[name]
        except KeyError:
            raise AuxLossError(
                f"no output named {name!r}; the outputs are 'main' and {sorted(self.aux)}. "
                "Use one of these as a task's `source`."
            ) from None

    def __iter__(self) -> Any:
        # Refused rather than left to __getitem__'s integer lookups: nn.DataParallel combines its replicas'
        # outputs by iterating them (torch.nn.parallel.gather), and without this it silently returned
        # Outputs(main=<map object>, aux={}).
        raise AuxLossError(
            "Outputs cannot be iterated or unpacked: read outputs.main, outputs.aux[name] and outputs.losses. "
            "nn.DataParallel gathers its replicas' outputs by iterating them, so it cannot combine an AuxModel's "
            "outputs: use DistributedDataParallel (torchrun), which auxloss supports."
        )


#: Which output a head reads when its layer runs several times in one forward (a weight-shared block, an RNN
#: cell called in a loop): ``"first"``, ``"last"``, ``"all"`` (every call's output stacked along a new dim 1,
#: so ``(N, ...)`` outputs become ``(N, calls, ...)``, like a ``batch_first`` sequence), or the index of the call
#: (``0`` is the first, ``-1`` the last).
Call = Literal["first", "last", "all"] | int
_CALL_NAMES = ("first", "last", "all")


@dataclasses.dataclass
class Tap:
    """Where a head reads from: ``layer`` (a qualified submodule name), an optional ``select``or, the ``head``.

    ``detach=True`` stops the head's gradient at the tap, so the head learns without shaping the trunk (a
    linear probe rather than an auxiliary loss).

    ``call`` says which output the head reads when the layer runs more than once per forward (see
    :data:`Call`). Left at ``None``, a layer that runs more than once is an error rather than a silent choice.
    """

    layer: str
    head: nn.Module
    select: Selector = None
    detach: bool = False
    call: Call | None = None

    def __post_init__(self) -> None:
        call = self.call
        if call is not None and call not in _CALL_NAMES and (isinstance(call, bool) or not isinstance(call, int)):
            raise AuxLossError(
                f"Tap on {self.layer!r}: call must be 'first', 'last', 'all', the index of a call (0 is the first, "
                f"-1 the last) or None, got {call!r}."
            )


def select(value: Any, selector: Selector) -> Any:
    """Apply a selector to a layer's output (see :data:`Selector`)."""
    if selector is None:
        return value
    if callable(selector):
        return selector(value)
    path = selector if isinstance(selector, tuple) else (selector,)
    for part in path:
        try:
            value = value[part]
        except (IndexError, KeyError, TypeError) as exc:
            raise AuxLossError(
                f"selector {selector!r} cannot pick {part!r} from a layer output of type {type(value).__name__}"
                f"{_describe(value)}; pick an index of a tuple, a key of a dict, or pass a callable."
            ) from exc
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f" with shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return " holding (" + ", ".join(_describe_short(v) for v in value) + ")"
    if isinstance(value, Mapping):
        return f" with keys {sorted(map(str, value))}"
    return ""


def _describe_short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe_short(v) for v in value) + ")"
    return type(value).__name__


def _as_tap(name: str, spec: Tap | tuple | Mapping) -> Tap:
    if isinstance(spec, Tap):
        return spec
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        return Tap(*spec)
    if isinstance(spec, Mapping):
        return Tap(**spec)
    raise AuxLossError(
        f"tap {name!r} must be a Tap(layer, head), a (layer, head[, select]) tuple or a dict, "
        f"got {type(spec).__name__}."
    )


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back through it is multiplied by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _Captures(threading.local):
    """One hook's captures in *this thread*: whether an AuxModel forward is running, and what each tap saw.

    Per thread, so two threads running one model, or ``DataParallel`` replicas (which share their hook objects
    and run one per thread, one per device), never see each other's captures; per hook, so nested AuxModels
    never do either.
    """

    def __init__(self) -> None:
        self.active = False
        # tap name -> [number of calls so far, the kept output (a list of outputs for "all" and negative indices)]
        self.records: dict[str, list[Any]] = {}


def _keeps_all(call: Call | None) -> bool:
    return call == "all" or (isinstance(call, int) and call < 0)


class _TapHook:
    """The forward hook of one tapped layer: keeps the selected output(s) for the heads, per thread.

    It owns its captures (no shared dict, no module-level state): :meth:`start` arms it for one forward,
    the hook records while armed, :meth:`take` reads and clears. A callable object rather than a closure, so
    that ``copy.deepcopy`` of an :class:`AuxModel` (EMA/SWA copies) gives the copy hooks of its own.
    """

    def __init__(self, layer: str, taps: list[tuple[str, Selector, bool, Call | None]]) -> None:
        self.layer = layer
        self.taps = taps
        self._local = _Captures()

    # A threading.local can be neither copied nor pickled; a copy starts with empty captures of its own.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = _Captures()

    def start(self) -> None:
        self._local.records = {}
        self._local.active = True

    def stop(self) -> None:
        self._local.active = False
        self._local.records = {}

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        local = self._local
        if not local.active:  # the model called outside its AuxModel's forward: nothing to keep alive
            return
        records = local.records
        for name, selector, detach, call in self.taps:
            feature = select(output, selector)
            if detach:
                feature = feature.detach()
            record = records.get(name)
            if record is None:
                if _keeps_all(call):
                    records[name] = [1, [feature]]
                else:
                    records[name] = [1, feature if call in (None, "first", "last", 0) else None]
                continue
            n = record[0]  # this call's index
            record[0] = n + 1
            if _keeps_all(call):
                record[1].append(feature)
            elif call is None or call == "last" or (not isinstance(call, str) and call == n):
                record[1] = feature

    def take(self) -> dict[str, Any]:
        """The features of the forward that just ran in this thread, by tap name; clears them."""
        records = self._local.records
        self._local.records = {}
        return {name: self._resolve(name, call, *records[name]) for name, _, _, call in self.taps if name in records}

    def _resolve(self, name: str, call: Call | None, n: int, kept: Any) -> Any:
        if call is None:
            if n > 1:
                raise AuxLossError(
                    f"tap {name!r}: layer {self.layer!r} ran {n} times in one forward pass (a weight-shared block, or "
                    "a cell called in a loop), so it is ambiguous which output the head reads. Say which: "
                    "Tap(..., call='last'), call='first', call=<index of the call>, or call='all' (every call's "
                    "output stacked along a new dim 1)."
                )
            return kept
        if call in ("first", "last"):
            return kept
        if call == "all":
            if not all(isinstance(f, Tensor) for f in kept):
                raise AuxLossError(
                    f"tap {name!r}: call='all' stacks the outputs of layer {self.layer!r}'s calls, so each must be a "
                    f"tensor, got {[type(f).__name__ for f in kept]}; give the tap a `select` that picks the tensor."
                )
            try:
                return torch.stack(kept, dim=1)
            except RuntimeError as exc:
                raise AuxLossError(
                    f"tap {name!r}: call='all' cannot stack the outputs of layer {self.layer!r}'s {n} calls, whose "
                    f"shapes differ ({[tuple(f.shape) for f in kept]}); pick one call with call=<index> instead."
                ) from exc
        if call >= n or -call > n:
            raise AuxLossError(
                f"tap {name!r}: call={call} asks for a call of layer {self.layer!r} that did not happen: it ran {n} "
                f"time{'s' if n != 1 else ''} in this forward pass. Use an index in [{-n}, {n - 1}], or 'last'."
            )
        return kept[call] if call < 0 else kept


class AuxModel(nn.Module):
    """A model with auxiliary heads on named layers. Build it with :func:`attach`.

    The user's model is held untouched as ``self.model``; the heads live in ``self.heads`` (an
    ``nn.ModuleDict``), so ``state_dict``, ``.to()``, DDP and ``torch.compile`` all see them. Forward hooks
    capture the tapped layers' outputs during the main forward; the heads run right after it.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, Tap | tuple | Mapping]) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise AuxLossError(f"attach() needs an nn.Module, got {type(model).__name__}.")
        if isinstance(model, AuxModel):
            raise AuxLossError("this model already has heads attached; pass several taps to one attach() call.")
        _refuse_compiled(model, None, "")
        self.model = model
        self.heads = nn.ModuleDict()
        self._taps: dict[str, Tap] = {}
        self._handles: list[RemovableHandle] = []
        # One hook per tapped layer. Each owns the features it captures (per thread), holding activations with
        # their autograd graph only while this model's forward runs: no memory outlives the step.
        self._hooks: list[_TapHook] = []
        # Per-tap factors on the gradient a head sends back into the trunk (1 = untouched). Amortized
        # gradient-aware weightings use them so that the trunk gets m_k·λ_k·g_k while the head keeps λ_k·g_k.
        self._trunk_grad_scales: dict[str, float] = {}
        self._representations = Representations()  # for representation-level weightings (keep_representations)
        self._stripped = False

        modules = dict(model.named_modules())
        layer_names = [n for n in modules if n]
        for name, spec in taps.items():
            tap = _as_tap(name, spec)
            if not isinstance(name, str) or not name or name == "main" or "." in name:
                raise AuxLossError(
                    f"tap name {name!r} is not usable: use a non-empty name without dots, other than 'main'."
                )
            if tap.layer not in modules or tap.layer == "":
                hint = close_matches(tap.layer, layer_names)
                raise AuxLossError(
                    f"tap {name!r}: the model has no layer named {tap.layer!r}. "
                    + (f"Closest names: {hint}. " if hint else "")
                    + "Run auxloss.list_layers(model, example_input) to see every tappable layer."
                )
            if not isinstance(tap.head, nn.Module):
                raise AuxLossError(f"tap {name!r}: the head must be an nn.Module, got {type(tap.head).__name__}.")
            _refuse_compiled(model, name, tap.layer)
            self._taps[name] = tap
            self.heads[name] = tap.head
        # Several taps may read the same layer: one hook per layer feeds them all.
        by_layer: dict[str, list[str]] = {}
        for name, tap in self._taps.items():
            by_layer.setdefault(tap.layer, []).append(name)
        for layer, names in by_layer.items():
            hook = _TapHook(layer, [(n, self._taps[n].select, self._taps[n].detach, self._taps[n].call) for n in names])
            self._hooks.append(hook)
            self._handles.append(modules[layer].register_forward_hook(hook))

    @property
    def taps(self) -> dict[str, Tap]:
        """The taps by name (read-only view)."""
        return dict(self._taps)

    def forward(self, *args: Any, **kwargs: Any) -> Outputs:
        if self._stripped:
            raise AuxLossError(
                "this AuxModel was stripped: its hooks are gone. Call the stripped model directly, or attach again."
            )
        emitted: dict[str, Any] = {}
        sinks = _SINKS.stack
        sinks.append(emitted)
        for hook in self._hooks:
            hook.start()
        keep = self._representations.begin()
        kept: dict[str, TapRepresentation | None] = {}
        try:
            main = self.model(*args, **kwargs)
            captured: dict[str, Any] = {}
            for hook in self._hooks:
                captured.update(hook.take())
            aux = {}
            for name, head in self.heads.items():
                if name not in captured:
                    raise AuxLossError(
                        f"tap {name!r}: layer {self._taps[name].layer!r} never ran in the forward pass, so its head "
                        "got no input. Tap a layer that the model's forward actually calls "
                        "(auxloss.list_layers shows only layers that ran)."
                    )
                feature = captured[name]
                scale = self._trunk_grad_scales.get(name)
                if keep is not None and name in keep:
                    if isinstance(feature, Tensor):  # the head's gradient reaches the trunk only through the weighting
                        kept[name] = keep_tap(feature)
                        feature = kept[name].head_input
                    else:
                        kept[name] = None
                elif scale is not None and scale != 1.0 and isinstance(feature, Tensor) and feature.requires_grad:
                    feature = _ScaleGrad.apply(feature, scale)
                aux[name] = head(feature)
        finally:
            for hook in self._hooks:
                hook.stop()
            sinks.pop()
        if keep is not None:
            self._representations.store(kept)
        # Hugging Face MoE models return their load-balancing loss as `aux_loss` (output_router_logits=True).
        hf_aux = main.get("aux_loss") if isinstance(main, Mapping) else getattr(main, "aux_loss", None)
        if isinstance(hf_aux, Tensor) and "aux_loss" not in emitted:
            emitted["aux_loss"] = hf_aux
        return Outputs(main=main, aux=aux, losses=emitted)

    def set_trunk_grad_scales(self, scales: Mapping[str, float] | None) -> None:
        """Scale the gradient each named tap's head sends back into the trunk (``None`` or ``{}``: untouched).

        The head's own parameters are not affected. Used by amortized gradient-aware weightings; the values are
        read at the next forward.
        """
        unknown = sorted(set(scales or {}) - set(self._taps))
        if unknown:
            raise AuxLossError(f"no tap named {unknown}; the taps are {sorted(self._taps)}.")
        self._trunk_grad_scales = dict(scales or {})

    def keep_representations(self, taps: Iterable[str]) -> None:
        """Ask the next forward with gradients to keep the named taps' representations (one-shot, this thread).

        Used by representation-level weightings (``mode="representation"``): in that forward each named tap's head
        reads its layer's output through a gradient cut, so the head's gradient reaches its own parameters but not
        the trunk, and :meth:`take_representations` hands over, per tap, the trunk's tensor and the head's input.
        The weighting then sends the head's gradient into the trunk itself, at the tap.
        """
        names = frozenset(taps)
        unknown = sorted(names - set(self._taps))
        if unknown:
            raise AuxLossError(f"no tap named {unknown}; the taps are {sorted(self._taps)}.")
        self._representations.arm(names)

    def take_representations(self) -> dict[str, TapRepresentation | None] | None:
        """What the last forward kept for :meth:`keep_representations` (tap -> its trunk tensor, the head's input and
        the head's gradient once the backward has run; ``None`` for a head that reads no tensor), or ``None`` when it
        kept nothing; handed over once."""
        return self._representations.take()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load an AuxModel checkpoint, or a checkpoint of the plain model (its trunk alone).

        A plain model's keys (``conv1.weight``) have no ``model.`` prefix, so the inherited method would call them
        all unexpected: a crash with ``strict=True``, a silent no-op without. They are loaded into the trunk
        instead (``strict`` applies to the trunk's keys), and the heads, which such a checkpoint cannot hold, keep
        their weights and are reported in ``missing_keys`` (pretrained weights without the aux heads,
        pytorch/vision#3648).
        """
        keys = set(state_dict)
        if keys and not keys & set(self.state_dict()) and keys & set(self.model.state_dict()):
            result = self.model.load_state_dict(state_dict, strict=strict, assign=assign)
            missing = [f"model.{k}" for k in result.missing_keys] + [f"heads.{k}" for k in self.heads.state_dict()]
            return nn.modules.module._IncompatibleKeys(missing, [f"model.{k}" for k in result.unexpected_keys])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def strip(self) -> nn.Module:
        """Remove every hook this wrapper added and give back the original model, for deployment.

        The returned module is the very object passed to :func:`attach`: its outputs are bit-identical to the
        original's, and the heads are dropped. This wrapper can no longer be called afterwards.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stripped = True
        return self.model

    def extra_repr(self) -> str:
        return ", ".join(f"{n}<-{t.layer}" for n, t in self._taps.items())


def _refuse_compiled(model: nn.Module, tap: str | None, layer: str) -> None:
    """Refuse a model, or a tap inside a submodule, compiled by ``torch.compile`` before attach().

    Compiled code never calls forward hooks added after compilation (pytorch/pytorch#117758), so a head there
    would silently get nothing, or stale input.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing can have been compiled
    compiled_type = getattr(eval_frame, "OptimizedModule", None)
    if compiled_type is None:
        return
    parts = layer.split(".") if layer else []
    for depth in range(len(parts) + 1):
        where = ".".join(parts[:depth])
        if isinstance(model.get_submodule(where), compiled_type):
            what = "the model" if not where else f"its submodule {where!r}"
            who = f"tap {tap!r}: " if tap else "attach(): "
            raise AuxLossError(
                f"{who}{what} was compiled with torch.compile before attach(), and compiled code ignores forward "
                "hooks added afterwards (pytorch/pytorch#117758), so the heads would never see their layers. "
                "Attach first, then compile: model = torch.compile(auxloss.attach(net, taps)). The plain module of "
                "a compiled one is its `._orig_mod`."
            )


def attach(
    model: nn.Module,
    taps: Mapping[str, Tap | tuple | Mapping],
    *,
    example_input: Any = None,
) -> AuxModel:
    """Attach auxiliary heads to named layers of ``model`` and return an :class:`AuxModel`.

    Args:
        model: any ``nn.Module``; it is not modified except for the forward hooks (undone by ``strip()``).
        taps: ``{name: Tap(layer, head, select=None)}``; a ``(layer, head[, select])`` tuple also works.
            ``model`` must not be compiled yet: compile the returned AuxModel instead (hooks added to compiled
            code are ignored, so this is refused with an error).
        example_input: a sample input (a tensor, or a tuple of positional args). When given, one forward pass in
            eval mode without gradients infers the heads' input sizes (their lazy layers are materialised) and
            checks that every tapped layer runs. Give it before building the optimizer, since lazy parameters
            only exist afterwards, and always under DDP.

    Example:
        >>> import torch, auxloss as al
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> m = al.attach(net, {"aux": al.Tap("1", al.LinearHead(3))}, example_input=torch.randn(2, 4))
        >>> m(torch.randn(5, 4)).aux["aux"].shape
        torch.Size([5, 3])
    """
    aux_model = AuxModel(model, taps)
    if example_input is not None:
        materialize(aux_model, example_input)
    return aux_model


def materialize(aux_model: AuxModel, example_input: Any) -> None:
    """Run one eval-mode, no-grad forward so lazy heads infer their input sizes; restores the training flags."""
    flags = {m: m.training for m in aux_model.modules()}
    aux_model.eval()
    try:
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            aux_model(*args)
    finally:
        for m, flag in flags.items():
            m.training = flag


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One tappable layer: its qualified name, module type, output description and parameter count."""

    name: str
    type: str
    output: str
    params: int

    def __str__(self) -> str:
        return f"{self.name:<40} {self.type:<22} {self.output:<28} {self.params:>11,}"


def list_layers(
    model: nn.Module, example_input: Any, *, leaves: bool = False, max_depth: int | None = None
) -> list[LayerInfo]:
    """Every layer that runs in ``model``'s forward on ``example_input``, in call order, with its output shape.

    Only layers that actually ran are listed: those are exactly the ones a tap can read. ``leaves=True`` keeps
    only modules without children; ``max_depth=1`` only top-level children (``layer1`` but not ``layer1.0``).
    """
    order: list[str] = []  # call order (pre-hooks), so that a block comes before its children
    infos: dict[str, LayerInfo] = {}
    handles = []
    for name, module in model.named_modules():
        if not name or (leaves and next(module.children(), None) is not None):
            continue
        if max_depth is not None and name.count(".") >= max_depth:
            continue

        def pre_hook(mod: nn.Module, args: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)

        def hook(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
            if name not in infos:  # a module called twice keeps its first output
                infos[name] = LayerInfo(
                    name, type(mod).__name__, _describe_short(output), sum(p.numel() for p in mod.parameters())
                )

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(hook))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return [infos[n] for n in order if n in infos]

