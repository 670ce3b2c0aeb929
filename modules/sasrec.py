"""SASRec (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation"): an item-ID causal transformer.

Differences from the paper, all standard in recent re-evaluations of the model:
- trained with full softmax cross-entropy over the whole catalogue at every position (instead of one
  sampled negative with binary cross-entropy), which makes it a much stronger baseline;
- pre-LayerNorm blocks (the paper's code also normalises before attention) with GELU feed-forward;
- output scores are dot products with the (shared) input item embeddings, as in the paper.

Tokens: item row r is token r + 1, PAD = 0. Sequences are left-padded so the most recent item is always
the last position. Pure torch/numpy: no I/O, no printing.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PAD = 0
# Above this many logits per batch (2**27 float32 = 512 MiB), the loss is computed in chunks of positions
# whose logits are recomputed in the backward pass (`chunked_cross_entropy`): at ML-25M's preset
# (128 windows x 200 positions x 62,423 items) the whole (positions x items) matrix, its softmax and their
# gradients would need ~25 GB.
MAX_LOSS_LOGITS = 2 ** 27


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          max_logits: int = MAX_LOSS_LOGITS) -> torch.Tensor:
    """Mean cross-entropy of the scores hidden (n, D) @ weight (N, D).T against targets (n,), equal to
    F.cross_entropy of the full (n, N) logits (tested), holding at most ~max_logits of them at a time.

    Small batches take the direct path. Larger ones go chunk by chunk under activation checkpointing: each
    chunk's logits are freed after its forward and recomputed in the backward (one extra matmul per chunk).
    """
    n, n_items = hidden.shape[0], weight.shape[0]
    if n * n_items <= max_logits:
        return F.cross_entropy((hidden @ weight.T).float(), targets)
    rows = max(1, max_logits // n_items)
    total = sum(checkpoint(_chunk_cross_entropy, hidden[lo:lo + rows], weight, targets[lo:lo + rows], use_reentrant=False)
                for lo in range(0, n, rows))
    return total / n


# ----------------------------------------------------------------------------------------------------
# Sequences: left-padded token windows cut from CSR histories (numpy, vectorised over users)
# ----------------------------------------------------------------------------------------------------

def left_padded_windows(item_index: np.ndarray, window_starts: np.ndarray, window_ends: np.ndarray,
                        width: int) -> np.ndarray:
    """(W, width) int64 tokens (item row + 1) of events [start, end) of each window, left-padded with PAD.

    A window longer than `width` keeps its last `width` events (the most recent ones).
    """
    window_starts = np.asarray(window_starts, dtype=np.int64)
    window_ends = np.asarray(window_ends, dtype=np.int64)
    positions = window_ends[:, None] - width + np.arange(width)[None, :]
    inside = positions >= window_starts[:, None]
    tokens = np.asarray(item_index, dtype=np.int64)[np.clip(positions, 0, None)] + 1
    return np.where(inside, tokens, PAD)


def training_windows(item_index: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int,
                     max_windows_per_user: int | None = None) -> np.ndarray:
    """(W, max_len + 1) tokens covering every next-item transition of each user's training events once.

    User events [start, end) with n = end - start items give n - 1 transitions; windows of max_len + 1
    tokens are cut backwards from the end, overlapping by one token, so the first window of a user always
    holds its most recent items. Model input is window[:, :-1], target window[:, 1:].
    max_windows_per_user: keep only that many most recent windows of each user (None: all), which bounds
    the cost of an epoch when a few users have thousands of events.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    transitions = np.clip(ends - starts - 1, 0, None)
    n_windows = -(-transitions // max_len)  # ceil; users with < 2 events give none
    if max_windows_per_user is not None:
        if max_windows_per_user < 1:
            raise ValueError(f"max_windows_per_user must be >= 1 or None, got {max_windows_per_user}.")
        n_windows = np.minimum(n_windows, max_windows_per_user)
    user_of_window = np.repeat(np.arange(len(starts)), n_windows)
    first_window = np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    k = np.arange(n_windows.sum()) - first_window  # 0 for the most recent window of each user
    window_ends = ends[user_of_window] - k * max_len
    return left_padded_windows(item_index, starts[user_of_window], window_ends, max_len + 1)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a boolean mask (True = may attend)."""

    def __init__(self, hidden_dim: int, n_heads: int, dropout: float):
        super().__init__()
        if hidden_dim % n_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by n_heads {n_heads}.")
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); allowed: (B, 1, L, L) bool. Returns (B, L, D)."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, hidden_dim: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden_dim)
        self.attn = CausalSelfAttention(hidden_dim, n_heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden_dim)
        self.ffn = nn.Sequential(nn.Linear(hidden_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, hidden_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.dropout(self.attn(self.attn_norm(x), allowed))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    """Causal transformer over item-ID sequences that scores the whole catalogue at every position.

    n_items:    N, the catalogue size (item rows 0..N-1; token r + 1, PAD = 0).
    hidden_dim: D, embedding and model width.
    n_layers, n_heads: transformer depth and attention heads (D % n_heads == 0).
    max_len:    L_max, the longest input sequence (learned positional embeddings).
    dropout:    on embeddings, attention weights and residual branches.
    ffn_dim:    feed-forward width (default 4 * D).
    """

    def __init__(self, n_items: int, hidden_dim: int, n_layers: int, n_heads: int, max_len: int,
                 dropout: float, ffn_dim: int | None = None):
        super().__init__()
        if n_items < 1 or max_len < 1:
            raise ValueError(f"n_items ({n_items}) and max_len ({max_len}) must be >= 1.")
        self.n_items = n_items
        self.max_len = max_len
        self.max_loss_logits = MAX_LOSS_LOGITS
        self.item_embedding = nn.Embedding(n_items + 1, hidden_dim, padding_idx=PAD)
        self.position_embedding = nn.Embedding(max_len, hidden_dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden_dim, n_heads, ffn_dim or 4 * hidden_dim, dropout)
                                    for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(hidden_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-style N(0, 0.02) weights, zero biases; the PAD embedding stays zero."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) int64, left-padded with PAD, L <= max_len. Returns hidden states (B, L, D)."""
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}; cut inputs to the "
                             f"last max_len items.")
        is_item = tokens != PAD
        positions = torch.arange(length, device=tokens.device)
        # Scale as in the paper's code so item identity dominates the position signal at init.
        x = self.item_embedding(tokens) * math.sqrt(self.item_embedding.embedding_dim) \
            + self.position_embedding(positions)
        x = self.embedding_dropout(x) * is_item.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        # A query may attend to earlier real items; every position also sees itself, so a padded
        # query never has an all-masked row (which would give NaN).
        allowed = causal & (is_item[:, None, :] | torch.eye(length, dtype=torch.bool, device=tokens.device))
        allowed = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., D) -> (..., N) scores of item rows 0..N-1 (dot product with item embeddings)."""
        return hidden @ self.item_embedding.weight[1:].T

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean full-softmax cross-entropy over every real transition (input item -> next item).

        inputs, targets: (B, L) tokens; targets are inputs shifted by one. Positions whose input or target
        is PAD are skipped (a user's first item has no predecessor to predict it from). Logits are computed
        only at real transitions, which saves the padded share of the (B, L, N) matmul; above
        `max_loss_logits` of them they are computed in chunks (`chunked_cross_entropy`).
        """
        hidden = self(inputs)
        has_target = (targets != PAD) & (inputs != PAD)
        return chunked_cross_entropy(hidden[has_target], self.item_embedding.weight[1:], targets[has_target] - 1,
                                     self.max_loss_logits)

    @torch.no_grad()
    def score_next(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) left-padded histories -> (B, N) float32 scores for the next item (last position).

        The catalogue scores are computed in float32 even under bf16 autocast: bf16 logits (8-bit mantissa)
        tie for most users inside the top 10 of 62k items, and ties would then be decided by item row.
        """
        hidden = self(tokens)[:, -1].float()
        with torch.autocast(tokens.device.type, enabled=False):
            return self.item_logits(hidden)
