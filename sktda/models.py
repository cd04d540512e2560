"""Small torch modules for examples, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "ConvNet", "TokenCrossEntropy", "TokenTransformer"]


class MLP(nn.Module):
    """A multilayer perceptron: ``Linear -> ReLU -> Dropout`` per hidden layer, then
    a linear output layer.

    Parameters
    ----------
    n_features : int
        Input dimension.
    n_outputs : int
        Output dimension (classes for a classifier, 1 for a regressor).
    hidden : sequence of int, default=(128,)
        Widths of the hidden layers.
    dropout : float, default=0.1
        Dropout rate after each hidden layer (0 disables dropout).
    """

    def __init__(
        self,
        n_features: int = 64,
        n_outputs: int = 10,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, X):
        """Logits (or regression outputs) of shape ``(n, n_outputs)`` for ``X`` of
        shape ``(n, n_features)``."""
        return self.layers(X)


class ConvNet(nn.Module):
    """A small CNN for ``(n, C, H, W)`` images: ``Conv2d(3x3) -> ReLU -> MaxPool(2)``
    per block, then dropout and a linear output layer.

    Parameters
    ----------
    in_channels : int, default=1
    n_outputs : int, default=10
    channels : sequence of int, default=(16, 32)
        Output channels of the convolution blocks.
    image_size : int, default=8
        Height and width of the (square) input images.
    dropout : float, default=0.1
        Dropout rate before the output layer (0 disables it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_outputs: int = 10,
        channels: Sequence[int] = (16, 32),
        image_size: int = 8,
        dropout: float = 0.1,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width, size = in_channels, image_size
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width, size = c, size // 2
        layers.append(nn.Flatten())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width * size * size, n_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, X):
        """Logits of shape ``(n, n_outputs)`` for images ``X`` of shape ``(n, C, H, W)``."""
        return self.layers(X)


class TokenTransformer(nn.Module):
    """A small transformer encoder on integer token ids ``(n, T)``.

    With ``n_outputs`` it is a sequence classifier (mean of the token states over
    the unmasked positions, then a linear layer); with ``n_outputs=None`` it is a
    causal language model returning ``(n, T, vocab_size)`` next-token logits. A
    classifier with ``causal=True`` attends causally, as the language model does,
    so it can start from a pretrained language model's weights (all but ``head``).
    ``forward(input_ids, attention_mask=None)`` takes an optional 0/1 mask, so it
    accepts a dict ``{"input_ids": ..., "attention_mask": ...}`` through skorch.

    Parameters
    ----------
    vocab_size : int, default=128
    n_outputs : int or None, default=None
    d_model : int, default=64
    n_heads : int, default=4
    n_layers : int, default=2
    max_len : int, default=128
    dropout : float, default=0.1
    causal : bool or None, default=None
        Causal attention; None means causal for a language model only.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        n_outputs: int | None = None,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        max_len: int = 128,
        dropout: float = 0.1,
        causal: bool | None = None,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.language_model = n_outputs is None
        self.causal = self.language_model if causal is None else bool(causal)
        self.head = nn.Linear(d_model, vocab_size if self.language_model else n_outputs)

    def forward(self, input_ids, attention_mask=None):
        """Next-token logits ``(n, T, vocab_size)`` of a language model, or class
        logits ``(n, n_outputs)`` from the hidden states averaged over the positions
        that ``attention_mask`` (1 = token, 0 = padding) keeps."""
        T = input_ids.shape[-1]
        positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)  # one row per sample
        h = self.embed(input_ids) + self.position(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=h.device) if self.causal else None
        padding = None if attention_mask is None else attention_mask == 0
        h = self.norm(self.encoder(h, mask=mask, src_key_padding_mask=padding, is_causal=self.causal))
        if self.language_model:
            return self.head(h)
        if attention_mask is None:
            return self.head(h.mean(1))
        weights = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * weights).sum(1) / weights.sum(1).clamp_min(1))


class TokenCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy of ``(n, T, vocab)`` logits against ``(n, T)`` next tokens, for a
    skorch ``NeuralNet`` language model (``ignore_index`` positions left out)."""

    def forward(self, logits, target):
        """Mean cross-entropy over all kept positions."""
        return super().forward(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
