"""Adaptive fusion of item feature blocks in front of the RQ-VAE encoder (`BlockFusion`).

The fused item features x (B, F) of step 5 concatenate blocks (genres, year, tags, poster, ...). A block
with a mask column can be absent for an item: its feature columns then hold 0 and its mask column the
lower of its two values. Instead of feeding the concatenation to the encoder, `BlockFusion` projects each
block's feature columns with its own small MLP to a common width d (tokens h_b) and mixes the blocks an
item has with weights w_b that sum to 1 over its present blocks and are exactly 0 on its absent ones:

- 'gated':     w = softmax over present blocks of g_b([h_b; c]), c the mean token of the present blocks;
- 'attention': a learned query attends over the tokens h_b + e_b (e_b a learned block embedding), absent
               tokens masked out of the attention; w is the attention averaged over heads.

Absent blocks are masked, never mixed in as zeros: their feature values cannot change the output.
Block dropout (training only) hides each present block with probability p, but never all the present blocks
of an item, so the encoder also learns to place items that lack a modality (no poster, no user tags).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

MODES = ("gated", "attention")


@dataclass(frozen=True)
class BlockSpec:
    """Where one block lives in x (F columns): feature columns [start, stop) and, for a block some items
    lack, the mask column whose value is above `mask_threshold` exactly for the items that have it."""

    name: str
    feature_columns: tuple[int, int]
    mask_column: int | None = None
    mask_threshold: float | None = None

    @property
    def width(self) -> int:
        return self.feature_columns[1] - self.feature_columns[0]

    def to_config(self) -> dict:
        """Plain dict (JSON and `torch.load(weights_only=True)` safe) for the model config."""
        return {"name": self.name, "feature_columns": [int(c) for c in self.feature_columns],
                "mask_column": None if self.mask_column is None else int(self.mask_column),
                "mask_threshold": None if self.mask_threshold is None else float(self.mask_threshold)}

    @classmethod
    def from_config(cls, config: dict | "BlockSpec") -> "BlockSpec":
        if isinstance(config, BlockSpec):
            return config
        missing = [key for key in ("name", "feature_columns") if key not in config]
        if missing:
            raise ValueError(f"block layout entry {config} lacks {missing}: each block needs name, "
                             f"feature_columns [start, stop) and optionally mask_column + mask_threshold.")
        start, stop = (int(c) for c in config["feature_columns"])
        mask_column, threshold = config.get("mask_column"), config.get("mask_threshold")
        return cls(str(config["name"]), (start, stop), None if mask_column is None else int(mask_column),
                   None if threshold is None else float(threshold))


def check_layout(blocks: Sequence[BlockSpec], input_dim: int) -> None:
    """ValueError unless the blocks have distinct names, non-empty in-range feature columns that do not
    overlap, and a mask column (outside every block's features) exactly when they have a threshold."""
    if not blocks:
        raise ValueError("the block layout is empty: adaptive fusion needs at least one block.")
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise ValueError(f"block names must be distinct, got {names}.")
    taken = np.zeros(input_dim, dtype=bool)
    for block in blocks:
        start, stop = block.feature_columns
        if not 0 <= start < stop <= input_dim:
            raise ValueError(f"block {block.name}: feature_columns [{start}, {stop}) must be a non-empty range "
                             f"inside the {input_dim} input columns.")
        if taken[start:stop].any():
            raise ValueError(f"block {block.name}: feature_columns [{start}, {stop}) overlap another block's.")
        taken[start:stop] = True
    for block in blocks:
        if (block.mask_column is None) != (block.mask_threshold is None):
            raise ValueError(f"block {block.name}: give mask_column and mask_threshold together (or neither, "
                             f"for a block every item has).")
        if block.mask_column is not None and (not 0 <= block.mask_column < input_dim or taken[block.mask_column]):
            raise ValueError(f"block {block.name}: mask_column {block.mask_column} must be an input column outside "
                             f"every block's feature columns.")


def block_presence(x: torch.Tensor, blocks: Sequence[BlockSpec]) -> torch.Tensor:
    """(B, n_blocks) bool: which blocks each row of x (B, F) has (a block without mask column: every row)."""
    columns = [torch.ones(len(x), dtype=torch.bool, device=x.device) if b.mask_column is None
               else x[:, b.mask_column] > b.mask_threshold for b in blocks]
    return torch.stack(columns, dim=1)


def drop_blocks(present: torch.Tensor, probability: float) -> torch.Tensor:
    """Hide each present block (B, n) with `probability`; a row that would lose all of them keeps one of its
    present blocks, chosen uniformly. Uses torch's global generator (like nn.Dropout)."""
    if probability <= 0:
        return present
    keep = present & (torch.rand(present.shape, device=present.device) >= probability)
    lost = present.any(1) & ~keep.any(1)
    # One uniformly chosen present block per row: the largest of uniform scores over the present ones.
    choice = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0).argmax(1)
    rescue = nn.functional.one_hot(choice, present.shape[1]).bool()
    return torch.where(lost.unsqueeze(1), rescue, keep)


class FusionOutput(NamedTuple):
    """fused (B, d); weights (B, n_blocks), 0 on blocks not used, summing to 1 per row; used (B, n_blocks)
    bool, the blocks that entered the mix (present, and not dropped in training)."""

    fused: torch.Tensor
    weights: torch.Tensor
    used: torch.Tensor


class BlockFusion(nn.Module):
    """Per-block MLPs to width `dim`, mixed by a masked gate or a masked learned-query attention.

    Args:
        blocks: the layout (`BlockSpec` or their `to_config` dicts), in column order.
        input_dim: F, width of x (checked against the layout).
        mode: 'gated' or 'attention'.
        dim: d, width of every block token and of the fused vector.
        block_dropout: training-only probability of hiding a present block (never all of an item's).
        heads: attention heads ('attention' only); d must be divisible by it.
    """

    def __init__(self, blocks: Sequence[BlockSpec | dict], input_dim: int, mode: str = "gated", dim: int = 64,
                 block_dropout: float = 0.0, heads: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"fusion mode must be one of {MODES}, got {mode!r}.")
        if not 0.0 <= block_dropout < 1.0:
            raise ValueError(f"block_dropout must be in [0, 1), got {block_dropout}.")
        if mode == "attention" and (heads < 1 or dim % heads):
            raise ValueError(f"attention fusion: dim {dim} must be divisible by heads {heads}.")
        self.blocks = [BlockSpec.from_config(b) for b in blocks]
        check_layout(self.blocks, input_dim)
        self.mode, self.dim, self.block_dropout, self.heads = mode, int(dim), float(block_dropout), int(heads)
        n = len(self.blocks)
        # LayerNorm on every token: blocks arrive at very different scales (year is one column of weight 0.5),
        # and a token must not win the mix by its norm alone.
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(b.width, dim), nn.SiLU(), nn.Linear(dim, dim), nn.LayerNorm(dim))
            for b in self.blocks)
        if mode == "gated":
            # Per-block gate on [own token; mean present token]: a block's weight may depend on the others.
            self.gate_weight = nn.Parameter(torch.randn(n, 2 * dim) / math.sqrt(2 * dim))
            self.gate_bias = nn.Parameter(torch.zeros(n))
        else:
            self.block_embedding = nn.Parameter(torch.randn(n, dim) * 0.02)
            self.query = nn.Parameter(torch.randn(heads, dim // heads) / math.sqrt(dim // heads))
            self.key = nn.Linear(dim, dim)
            self.value = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, dim)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def presence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_blocks) bool: the blocks each row of x (B, F) has."""
        return block_presence(x, self.blocks)

    def forward(self, x: torch.Tensor) -> FusionOutput:
        """x (B, F) -> fused (B, d) and the weight of every block; in training mode with block dropout."""
        present = self.presence(x)
        if not bool(present.any(1).all()):
            rows = torch.nonzero(~present.any(1)).squeeze(1)
            raise ValueError(f"{len(rows)} rows of the batch (first: {rows[:5].tolist()}) have none of the blocks "
                             f"{self.names}: every item needs at least one block (a block without mask column, "
                             f"such as genres, has all items).")
        used = drop_blocks(present, self.block_dropout) if self.training else present
        tokens = torch.stack([projection(x[:, b.feature_columns[0]:b.feature_columns[1]])
                              for b, projection in zip(self.blocks, self.projections)], dim=1)   # (B, n, d)
        # Unused tokens are replaced, not multiplied, by 0: inf or NaN in an absent block cannot leak.
        tokens = torch.where(used.unsqueeze(-1), tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        if self.mode == "gated":
            return self._gate(tokens, used)
        return self._attend(tokens, used)

    def _gate(self, tokens: torch.Tensor, used: torch.Tensor) -> FusionOutput:
        context = tokens.sum(1) / used.sum(1, keepdim=True).to(tokens.dtype)                    # (B, d)
        gate_input = torch.cat([tokens, context.unsqueeze(1).expand_as(tokens)], dim=-1)        # (B, n, 2d)
        logits = torch.einsum("bnk,nk->bn", gate_input, self.gate_weight) + self.gate_bias
        weights = logits.masked_fill(~used, float("-inf")).softmax(dim=1)                      # exact 0 if unused
        return FusionOutput(torch.einsum("bn,bnd->bd", weights, tokens), weights, used)

    def _attend(self, tokens: torch.Tensor, used: torch.Tensor) -> FusionOutput:
        batch, n, _ = tokens.shape
        tokens = tokens + self.block_embedding
        keys = self.key(tokens).view(batch, n, self.heads, -1)
        values = self.value(tokens).view(batch, n, self.heads, -1)
        logits = torch.einsum("bnhk,hk->bhn", keys, self.query) / math.sqrt(keys.shape[-1])
        attention = logits.masked_fill(~used.unsqueeze(1), float("-inf")).softmax(dim=-1)     # (B, H, n)
        mixed = torch.einsum("bhn,bnhk->bhk", attention, values).reshape(batch, -1)
        return FusionOutput(self.out(mixed), attention.mean(1), used)


def summarise_block_weights(weights: np.ndarray, present: np.ndarray, names: Sequence[str]) -> dict:
    """Per block, over all items: how many have it, its mean weight over those items, and the share of all
    items whose largest weight goes to it. weights (N, n) and present (N, n) bool, columns in `names` order."""
    top = weights.argmax(1)
    summary = {}
    for index, name in enumerate(names):
        has = present[:, index]
        summary[name] = {"n_items_with_block": int(has.sum()),
                         "mean_weight_when_present": float(weights[has, index].mean()) if has.any() else None,
                         "top_block_share": float((top == index).mean()) if len(top) else None}
    return summary
