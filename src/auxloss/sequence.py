"""Sequence auxiliary tasks: the unsupervised RNN losses of Trinh et al. 2018.

Trinh, Dai, Luong and Le, "Learning Longer-term Dependencies in RNNs with Auxiliary Losses" (ICML 2018): at a
random *anchor* time step, a separate small decoder RNN, started from the main RNN's state there, either
reconstructs the segment of inputs just before the anchor (**r-LSTM**, ``mode="reconstruct"``) or predicts the
segment just after it (**p-LSTM**, ``mode="predict"``). The auxiliary gradient is truncated: it reaches the main
RNN only through the last ``truncate`` steps before the anchor, so its cost does not grow with the sequence.

How it fits the library
-----------------------
The decoder is fed the true inputs (teacher forcing) and scored against them, so it needs the batch's input
sequence, which a head never sees. The work is therefore split in two:

* :class:`TrinhDecoderHead`, attached with a :class:`~auxloss.Tap` on the RNN (``select=0``: its per-step
  outputs), draws the anchors and returns a :class:`TrinhSample` ``(states, anchors)``;
* its :meth:`TrinhDecoderHead.loss` method, used as the task's loss callable with the input sequence as the
  target (``target="input"``), decodes the segments and scores them.

:func:`trinh_auxiliary` builds both from the model and the RNN's name::

    taps, tasks = trinh_auxiliary(net, "rnn", segment=10, truncate=10, weight=0.5)
    model = attach(net, taps, example_input=x[:1])
    objective = Objective(aux=tasks)

Positions, exactly
------------------
The RNN reads ``x[0], x[1], ..., x[T-1]``; its per-step output ``out[:, t]`` is its state after reading
``x[t]``. An anchor ``a`` is a count of inputs read: the state *at* the anchor is ``out[:, a - 1]``, the state
after reading ``x[0..a-1]``. With ``L = segment``:

* ``reconstruct``: the segment is ``x[a-L : a]``, the last ``L`` inputs read; ``a`` is drawn from ``[L, T]``;
* ``predict``: the segment is ``x[a : a+L]``, the next ``L`` inputs; ``a`` is drawn from ``[1, T-L]``.

The decoder reads a zero start vector then the segment shifted by one (``0, s_0, ..., s_{L-2}``) and predicts
``s_0, ..., s_{L-1}``, in time order. (The paper feeds the segment's first input and predicts the rest; the
start vector makes every one of the ``L`` inputs a target.) Its initial state is a learned linear map (then
tanh) of the main RNN's top-layer output at the anchor, since the decoder's size may differ from the main RNN's.

Truncation, exactly
-------------------
``truncate=None`` decodes from the tapped output ``out[:, a-1]``: the auxiliary gradient flows back through the
whole prefix ``x[0..a-1]``, in the same graph as the main loss. ``truncate=k`` matches the paper's truncated
backpropagation: the loss recomputes the last ``k`` steps before the anchor, ``x[a-k : a]``, with the main RNN's
own module (same weights), starting from the RNN's full state (``h`` and ``c`` of every layer) at step ``a-k``,
computed without gradient. The auxiliary gradient therefore reaches the RNN's weights and inputs only through
those ``k`` steps: the gradient of the auxiliary loss with respect to ``x[:a-k]`` is exactly zero. The
recomputation costs one gradient-free pass over the prefix and a ``k``-step pass with gradient; a fused
``nn.LSTM`` cannot stop its gradient in the middle of its own sequence, which is why it is recomputed.

Recomputing needs the RNN's input, which is taken to be the batch input (the target of the task): the RNN must
read the model input directly, with a zero initial state, as in the paper's pixel-by-pixel models. On its first
calls the loss checks that the recomputed state equals the tapped one and says so if it does not.

Not reproduced from the paper: its 2-layer LSTM(256) decoder over 600-step segments with truncation at 300 is a
choice of sizes (``hidden``, ``layers``, ``segment``, ``truncate``); its 20 epochs of auxiliary-only pretraining
have no equivalent here (the main task's weight is always 1), but a schedule on the auxiliary weight (a high
weight early, then less) is the closest analogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from auxloss._checks import integer, positive_int
from auxloss.errors import AuxLossError, close_matches
from auxloss.schedules import Schedule
from auxloss.taps import Tap
from auxloss.tasks import Task

__all__ = ["TrinhDecoderHead", "TrinhSample", "target_replication_loss", "trinh_auxiliary"]

Mode = Literal["reconstruct", "predict"]
_MODES = ("reconstruct", "predict")
_LOSSES = ("mse", "bce", "cross_entropy")
_CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class TrinhSample(NamedTuple):
    """What a :class:`TrinhDecoderHead` returns: the RNN's per-step outputs and the anchors drawn.

    ``states``: ``(N, T, H)``, the tapped outputs (with their graph). ``anchors``: ``(N, K)`` int64, on the
    states' device; anchor ``a`` is the number of inputs read (see the module docs).
    """

    states: Tensor
    anchors: Tensor


class TrinhDecoderHead(nn.Module):
    """Trinh et al. 2018's auxiliary decoder: reconstruct (r-LSTM) or predict (p-LSTM) a segment at an anchor.

    Attach it with ``Tap(rnn_layer, head, select=0)`` and score it with a task whose loss is :meth:`loss` and
    whose target is the input sequence ``(N, T, input_size)``; :func:`trinh_auxiliary` does both.

    Args:
        input_size: ``D``, the size of each input step (what the decoder reads and predicts).
        state_size: ``H``, the size of the main RNN's per-step output.
        segment: ``L``, the number of steps reconstructed or predicted at each anchor.
        mode: ``"reconstruct"`` (the ``L`` inputs before the anchor) or ``"predict"`` (the ``L`` after it).
        hidden: the decoder RNN's hidden size.
        layers: the decoder RNN's number of layers.
        cell: ``"lstm"`` or ``"gru"``, the decoder's cell.
        truncate: ``None`` (backpropagate through the whole prefix) or ``k``: the auxiliary gradient reaches the
            main RNN only through the ``k`` steps before the anchor. Needs ``rnn``.
        rnn: the main RNN module (an unidirectional, ``batch_first`` ``nn.LSTM``/``nn.GRU``/``nn.RNN``), used to
            recompute the truncated window. It is referenced, not owned: its weights stay the model's.
        anchors: anchors drawn per sequence (each one decodes its own segment; the loss is their mean).
        loss: ``"mse"`` (real-valued inputs), ``"bce"`` (inputs in [0, 1], the decoder predicts logits) or
            ``"cross_entropy"`` (one-hot or probability inputs over the ``D`` values).
        teacher_forcing: ``True`` (the paper's): the decoder reads the true segment shifted by one step.
            ``False``: it reads zeros, so the whole segment must come from the anchor state.
        seed: seeds the decoder's initial weights (drawn from it alone, not from the global random stream, so
            that they do not depend on when the head is built) and the head's own ``torch.Generator`` for the
            training anchors. The generator's state is saved in the
            head's ``state_dict`` (extra state), so a resumed run draws the very same anchors. In eval mode the
            anchors come from a fresh generator seeded from ``seed`` on every call, so evaluation is repeatable
            and never moves the training generator.
    """

    def __init__(
        self,
        input_size: int,
        state_size: int,
        segment: int,
        *,
        mode: Mode = "reconstruct",
        hidden: int = 64,
        layers: int = 1,
        cell: Literal["lstm", "gru"] = "lstm",
        truncate: int | None = None,
        rnn: nn.Module | None = None,
        anchors: int = 1,
        loss: Literal["mse", "bce", "cross_entropy"] = "mse",
        teacher_forcing: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.input_size = positive_int("input_size", input_size)
        self.state_size = positive_int("state_size", state_size)
        self.segment = positive_int("segment", segment)
        if mode not in _MODES:
            raise AuxLossError(f"mode must be 'reconstruct' (r-LSTM) or 'predict' (p-LSTM), got {mode!r}.")
        self.mode = mode
        self.hidden = positive_int("hidden", hidden)
        self.layers = positive_int("layers", layers)
        if cell not in _CELLS:
            raise AuxLossError(f"cell must be 'lstm' or 'gru', got {cell!r}.")
        self.cell = cell
        self.truncate = None if truncate is None else positive_int("truncate", truncate)
        if self.truncate is not None:
            if rnn is None:
                raise AuxLossError(
                    "truncate needs rnn=, the main RNN module, to recompute the last `truncate` steps before each "
                    "anchor; trinh_auxiliary(model, layer, ...) passes it for you."
                )
            _check_rnn(rnn, "rnn")
        # A plain tuple, not a submodule: the RNN's weights belong to the model (and its state_dict), not the head.
        self._rnn: tuple[nn.Module, ...] = (rnn,) if rnn is not None else ()
        self.n_anchors = positive_int("anchors", anchors)
        if loss not in _LOSSES:
            raise AuxLossError(f"loss must be one of {_LOSSES}, got {loss!r}.")
        self.loss_name = loss
        self.teacher_forcing = bool(teacher_forcing)
        self.seed = integer("seed", seed)
        self.generator = torch.Generator().manual_seed(seed)
        n_states = 2 if cell == "lstm" else 1
        # An RNN has no lazy form, so the weights are drawn here, from ``seed`` in a forked random stream: the
        # head starts the same whenever it is built (before or after the run seeds torch), and building it
        # leaves the global stream, and so everything built after it, untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.init = nn.Linear(state_size, layers * n_states * hidden)
            self.decoder = _CELLS[cell](input_size, hidden, num_layers=layers, batch_first=True)
            self.out = nn.Linear(hidden, input_size)
        self._checks_left = 3  # recomputed-vs-tapped state checks on the first truncated calls

    # -- the head: draw the anchors --------------------------------------------------------------------------
    def anchor_range(self, length: int) -> tuple[int, int]:
        """The inclusive range ``[lo, hi]`` anchors are drawn from for sequences of ``length`` steps."""
        if self.mode == "reconstruct":
            lo, hi = self.segment, length
        else:
            lo, hi = 1, length - self.segment
        if hi < lo:
            need = self.segment if self.mode == "reconstruct" else self.segment + 1
            raise AuxLossError(
                f"TrinhDecoderHead: sequences of {length} steps are too short for segment={self.segment} in "
                f"{self.mode!r} mode (it needs at least {need}); lower the segment."
            )
        return lo, hi

    def forward(self, states: Any) -> TrinhSample:
        if not isinstance(states, Tensor) or states.dim() != 3:
            shape = tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__
            raise AuxLossError(
                f"TrinhDecoderHead needs the RNN's per-step outputs (N, T, H), got {shape}; tap the RNN with "
                "select=0 (and batch_first=True)."
            )
        if states.shape[-1] != self.state_size:
            raise AuxLossError(
                f"TrinhDecoderHead was built for RNN outputs of size {self.state_size}, got {states.shape[-1]}; "
                "set state_size to the RNN's hidden size."
            )
        n, length = states.shape[0], states.shape[1]
        lo, hi = self.anchor_range(length)
        gen = self.generator if self.training else torch.Generator().manual_seed(self.seed + 7919)
        anchors = torch.randint(lo, hi + 1, (n, self.n_anchors), generator=gen)
        return TrinhSample(states, anchors.to(states.device))

    # -- the loss: decode and score ---------------------------------------------------------------------------
    def segment_positions(self, anchors: Tensor) -> Tensor:
        """``(..., L)`` indices into the time axis of each anchor's segment (see the module docs)."""
        offsets = torch.arange(self.segment, device=anchors.device)
        start = anchors - self.segment if self.mode == "reconstruct" else anchors
        return start.unsqueeze(-1) + offsets

    def decode(self, sample: TrinhSample, x: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's predictions and their targets, both ``(N·K, L, D)`` (row ``i·K + j``: anchor j of i)."""
        if not isinstance(sample, tuple) or len(sample) != 2:
            raise AuxLossError(
                f"TrinhDecoderHead.loss expects the head's (states, anchors) output, got {type(sample).__name__}; "
                "give the task source= the Trinh tap and no select."
            )
        states, anchors = sample
        x = self._check_input(x, states)
        n, k = anchors.shape
        rows = torch.arange(n, device=anchors.device).repeat_interleave(k)
        flat = anchors.reshape(-1)
        h = self._anchor_state(states, x, rows, flat)
        target = x.detach()[rows.unsqueeze(1), self.segment_positions(flat)]  # (B, L, D): data, never a path
        if self.teacher_forcing:
            teacher = torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]], dim=1)
        else:  # the segment must come from the anchor state alone
            teacher = torch.zeros_like(target)
        out, _ = self.decoder(teacher, self._initial_state(h))
        return self.out(out), target

    def loss(self, sample: TrinhSample, x: Tensor) -> Tensor:
        """The auxiliary loss: use it as the task's ``loss``, with the input sequence as its target."""
        pred, target = self.decode(sample, x)
        if self.loss_name == "mse":
            return F.mse_loss(pred, target)
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(pred, target)
        return F.cross_entropy(pred.reshape(-1, self.input_size), target.reshape(-1, self.input_size))

    def _check_input(self, x: Any, states: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3 and x.shape[-1] != self.input_size:
            # The target is a sequence, only not the one the RNN reads: a layer in front of the RNN (an input
            # projection, an embedding) changes its width, so pointing at another batch key would not help.
            raise AuxLossError(
                f"the Trinh task's target has {x.shape[-1]} features per step but the tapped RNN reads "
                f"{self.input_size}: a layer in front of the RNN (an input projection or an embedding) changes the "
                "sequence before the RNN sees it, and the Trinh loss reconstructs what the RNN reads. Tap an RNN "
                "that reads the batch's sequence directly, or give the task a target function (module:function) "
                f"returning the sequence the RNN reads, (N, T, {self.input_size})."
            )
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.input_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise AuxLossError(
                f"the Trinh task's target must be the input sequence (N, T, {self.input_size}), got {shape}; set the "
                "task's target to the batch key of the RNN's input (target='input')."
            )
        if x.shape[:2] != states.shape[:2]:
            raise AuxLossError(
                f"the input sequence has (N, T) = {tuple(x.shape[:2])} but the RNN's outputs have "
                f"{tuple(states.shape[:2])}; the target must be the very sequence the RNN read (batch_first)."
            )
        if not x.dtype.is_floating_point:
            x = x.float()
        return x.to(states.device)

    def _initial_state(self, h: Tensor) -> Any:
        n_states = 2 if self.cell == "lstm" else 1
        z = torch.tanh(self.init(h)).view(h.shape[0], n_states, self.layers, self.hidden)
        parts = [z[:, i].transpose(0, 1).contiguous() for i in range(n_states)]  # (layers, B, hidden) each
        return (parts[0], parts[1]) if n_states == 2 else parts[0]

    def _anchor_state(self, states: Tensor, x: Tensor, rows: Tensor, anchors: Tensor) -> Tensor:
        """The main RNN's top-layer output at each anchor, ``(B, H)``: tapped, or recomputed when truncated."""
        tapped = states[rows, anchors - 1]
        if self.truncate is None:
            return tapped
        rnn = self._rnn[0]
        k = self.truncate
        begin = (anchors - k).clamp(min=0)  # the window is x[begin : anchor], at most k steps
        seqs = x[rows]
        with torch.no_grad():
            h0 = _state_after(rnn, seqs, begin)
        idx = (begin.unsqueeze(1) + torch.arange(k, device=x.device)).clamp(max=x.shape[1] - 1)
        window = seqs.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        lengths = anchors - begin
        if bool((lengths == k).all()):  # every window is full: no packing (2x faster on a CPU)
            _, hn = rnn(window, h0)
        else:
            _, hn = rnn(pack_padded_sequence(window, lengths.cpu(), batch_first=True, enforce_sorted=False), h0)
        h = (hn[0] if isinstance(hn, tuple) else hn)[-1]
        if self._checks_left > 0 and not (rnn.training and rnn.dropout > 0 and rnn.num_layers > 1):
            self._checks_left -= 1
            if not torch.allclose(h.detach(), tapped.detach(), rtol=1e-3, atol=1e-4):
                err = float((h.detach() - tapped.detach()).abs().max())
                raise AuxLossError(
                    f"TrinhDecoderHead: the RNN state recomputed from the target sequence differs from the tapped one "
                    f"(max difference {err:.3g}). With truncate set, the RNN must read the task's target (the batch "
                    "input) directly, from a zero initial state; otherwise use truncate=None."
                )
        return h

    # -- resume: the generator is state --------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, segment={self.segment}, truncate={self.truncate}, anchors={self.n_anchors}, "
                f"loss={self.loss_name!r}, seed={self.seed}")


def _state_after(rnn: nn.Module, seqs: Tensor, lengths: Tensor) -> Any:
    """The RNN's full state (every layer; ``(h, c)`` for an LSTM) after reading ``seqs[i, :lengths[i]]``.

    A zero length gives the zero initial state. One packed pass over the longest prefix.
    """
    n = seqs.shape[0]
    hidden = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
    zeros_h = seqs.new_zeros(rnn.num_layers, n, hidden)
    zeros_c = seqs.new_zeros(rnn.num_layers, n, rnn.hidden_size)
    longest = int(lengths.max()) if n else 0
    if longest == 0:
        return (zeros_h, zeros_c) if isinstance(rnn, nn.LSTM) else zeros_h
    packed = pack_padded_sequence(seqs[:, :longest], lengths.clamp(min=1).cpu(), batch_first=True,
                                  enforce_sorted=False)
    _, state = rnn(packed)
    keep = (lengths > 0).to(seqs.dtype).view(1, n, 1)  # zero-length rows: the zero initial state
    if isinstance(state, tuple):
        return tuple(s * keep for s in state)
    return state * keep


def _check_rnn(rnn: Any, where: str) -> None:
    if not isinstance(rnn, nn.RNNBase):
        raise AuxLossError(
            f"{where} must be an nn.LSTM, nn.GRU or nn.RNN, got {type(rnn).__name__}; the Trinh losses need the RNN "
            "module itself to recompute the truncated window."
        )
    if not rnn.batch_first:
        raise AuxLossError(f"{where}: the RNN must be batch_first=True (inputs (N, T, D)).")
    if rnn.bidirectional:
        raise AuxLossError(
            f"{where}: the RNN is bidirectional; the Trinh losses anchor a unidirectional RNN's state (a backward "
            "direction has already read the future)."
        )


def trinh_auxiliary(
    model: nn.Module,
    layer: str,
    segment: int,
    *,
    name: str = "trinh",
    mode: Mode = "reconstruct",
    truncate: int | None = None,
    weight: float | Schedule = 1.0,
    hidden: int | None = None,
    layers: int = 1,
    cell: Literal["lstm", "gru"] = "lstm",
    anchors: int = 1,
    loss: Literal["mse", "bce", "cross_entropy"] = "mse",
    teacher_forcing: bool = True,
    seed: int = 0,
    input_key: str = "input",
) -> tuple[dict[str, Tap], list[Task]]:
    """Ready taps and tasks for Trinh et al.'s auxiliary loss on the RNN ``layer`` of ``model``.

    The decoder's sizes are read from the RNN (its ``input_size``; ``hidden`` defaults to the RNN's hidden size).
    Pass the taps to :func:`auxloss.attach` and the tasks to :class:`auxloss.Objective`::

        taps, tasks = trinh_auxiliary(net, "rnn", segment=10, truncate=10, weight=0.5)
        model = al.attach(net, taps, example_input=x[:1])
        objective = al.Objective(aux=tasks)

    The task reads the input sequence from the batch key ``input_key``, has no metric, and is weighted by
    ``weight`` (a float or a schedule). See :class:`TrinhDecoderHead` for the other arguments.
    """
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        hint = close_matches(layer, [n for n in modules if n])
        raise AuxLossError(
            f"trinh_auxiliary: the model has no layer named {layer!r}"
            + (f"; closest names: {hint}." if hint else ".")
        )
    rnn = modules[layer]
    _check_rnn(rnn, f"trinh_auxiliary: layer {layer!r}")
    state_size = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
    head = TrinhDecoderHead(
        rnn.input_size, state_size, segment, mode=mode, hidden=hidden or rnn.hidden_size, layers=layers, cell=cell,
        truncate=truncate, rnn=rnn, anchors=anchors, loss=loss, teacher_forcing=teacher_forcing, seed=seed,
    )
    taps = {name: Tap(layer, head, select=0)}
    tasks = [Task(name, source=name, target=input_key, loss=head.loss, metric=None, weight=weight)]
    return taps, tasks


def target_replication_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross entropy of per-step logits ``(N, T, C)`` against one label per sequence ``(N,)``, averaged over steps.

    Target replication (Lipton et al. 2016, "Learning to Diagnose with LSTM Recurrent Neural Networks"): the
    sequence's label supervises every time step, the recurrent analogue of deep supervision. Use it as the loss
    of a task on ``SequenceHead(C, mode="all")`` over the RNN's outputs.
    """
    if not isinstance(pred, Tensor) or pred.dim() != 3:
        shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise AuxLossError(f"target replication needs per-step logits (N, T, C), got {shape}; use "
                           "SequenceHead(C, mode='all').")
    target = torch.as_tensor(target, device=pred.device)
    if target.dim() != 1 or target.shape[0] != pred.shape[0]:
        raise AuxLossError(
            f"target replication needs one class label per sequence (N,) = ({pred.shape[0]},), got "
            f"{tuple(target.shape)}."
        )
    n, steps, classes = pred.shape
    return F.cross_entropy(pred.reshape(n * steps, classes), target.long().repeat_interleave(steps))
