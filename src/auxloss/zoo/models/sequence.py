"""Sequence trunks: :class:`LSTMClassifier` (an LSTM or GRU read by the Trinh auxiliary losses) and
:class:`TinyTransformer` (a small ViT-style encoder over image patches or token ids)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from auxloss._checks import fraction_below_one, int_at_least
from auxloss.errors import AuxLossError

__all__ = ["LSTMClassifier", "TinyTransformer"]

_RNN_CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


class LSTMClassifier(nn.Module):
    """An RNN over a sequence ``(N, T, D)`` (``batch_first``), classifying from its last step's output.

    ``rnn`` is an ``nn.LSTM`` (or ``nn.GRU`` with ``cell="gru"``) of ``layers`` layers, read by the Trinh
    auxiliary losses (:mod:`auxloss.sequence`) and by :class:`~auxloss.heads.SequenceHead` taps (``select=0``
    picks its per-step outputs); ``fc`` maps the last step's output to the classes. The RNN starts from a zero
    state and reads the model input directly, which is what the truncated Trinh losses need.
    """

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        hidden: int = 64,
        layers: int = 1,
        cell: Literal["lstm", "gru"] = "lstm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_size = int_at_least("input_size", input_size)
        int_at_least("num_classes", num_classes)
        int_at_least("hidden", hidden)
        int_at_least("layers", layers)
        dropout = fraction_below_one("dropout", dropout)
        if cell not in _RNN_CELLS:
            raise AuxLossError(f"cell must be 'lstm' or 'gru', got {cell!r}.")
        # nn.LSTM only applies dropout between layers, and warns when given one with a single layer.
        self.rnn = _RNN_CELLS[cell](input_size, hidden, num_layers=layers, batch_first=True,
                                    dropout=dropout if layers > 1 else 0.0)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise AuxLossError(
                f"LSTMClassifier expects a sequence (N, T, {self.input_size}), got shape {tuple(x.shape)}; "
                "images can be read row by row as (N, H, W)."
            )
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class TinyTransformer(nn.Module):
    """A small pre-norm transformer classifier (a ViT for images, or a token classifier) with a class token.

    Images ``(N, C, H, W)`` are cut into ``patch_size`` patches by a strided conv (``embed``); with
    ``vocab_size`` set, the input is instead token ids ``(N, L)`` embedded by an ``nn.Embedding``. A learned
    class token is prepended and learned positions added, then ``blocks`` -- an ``nn.ModuleList`` of
    ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True)`` -- run in turn; ``norm`` and ``fc``
    classify from the class token.

    The tap points are ``blocks.0``, ``blocks.1``, ...: each outputs the token sequence ``(N, 1 + P, dim)``, class
    token first, so a deep-supervision head reads it with ``LinearHead(C, pool="cls")`` or pools every token with
    ``pool="mean_tokens"`` (see :func:`auxloss.recipes.transformer_deep_supervision`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 7,
        vocab_size: int | None = None,
        max_len: int = 128,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        int_at_least("num_classes", num_classes)
        int_at_least("dim", dim)
        int_at_least("depth", depth)
        int_at_least("heads", heads)
        dropout = fraction_below_one("dropout", dropout)
        if dim % heads:
            raise AuxLossError(f"dim ({dim}) must be divisible by heads ({heads}).")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise AuxLossError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}.")
        self.vocab_size = vocab_size
        if vocab_size is None:
            int_at_least("in_channels", in_channels)
            int_at_least("image_size", image_size)
            int_at_least("patch_size", patch_size)
            if image_size % patch_size:
                raise AuxLossError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
            self.embed: nn.Module = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
            n_tokens = (image_size // patch_size) ** 2
        else:
            int_at_least("vocab_size", vocab_size)
            n_tokens = int_at_least("max_len", max_len)
            self.embed = nn.Embedding(vocab_size, dim)
        self.n_tokens = n_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=round(dim * mlp_ratio), dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.vocab_size is None:
            if x.dim() != 4:
                raise AuxLossError(f"TinyTransformer expects images (N, C, H, W), got shape {tuple(x.shape)}.")
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, P, dim)
        else:
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise AuxLossError(f"TinyTransformer with vocab_size expects token ids (N, L), got {x.dtype} "
                                   f"{tuple(x.shape)}.")
            tokens = self.embed(x)
        if tokens.shape[1] > self.n_tokens:
            raise AuxLossError(f"TinyTransformer got {tokens.shape[1]} tokens but has positions for {self.n_tokens}; "
                               "raise max_len or check image_size/patch_size.")
        h = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        h = h + self.pos_embed[:, : h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.fc(self.norm(h[:, 0]))

