"""Beam search over semantic IDs, constrained by a prefix trie of the IDs that exist, batched on the device.

The trie is tensorised: a prefix of length l+1 is the mixed-radix integer of its codes, and level l
of the trie is the sorted array of every existing prefix key. The children of a beam are found for
all users and beams at once with one `searchsorted`, so the hot path has no Python loop over users
or beams (only over the L+1 levels).

Scores are the model's log-probabilities, log-softmax over each level's full code slice, summed over
levels; invalid continuations are masked to -inf afterwards (not renormalised), so a beam as wide as
the catalogue ranks items exactly as exhaustive teacher-forced scoring does.

Items already in a user's input history are excluded: a prefix survives only while at least one of
the items below it is unseen by that user, so every live beam ends in an unseen item and decoding
returns min(beam_width, unseen items) distinct real items.

Pure torch: no I/O, no printing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.tiger import Tiger

NO_ITEM = -1


class SemanticIdTrie:
    """Prefix tables of the existing semantic IDs (N, L+1), on one device.

    level_keys[l]:  (n_nodes_l,) sorted int64 keys of the distinct prefixes of length l+1.
    item_node[l]:   (N,) index into level_keys[l] of each item's prefix.
    subtree_size[l]:(n_nodes_l,) number of items below each prefix.
    leaf_item:      (N,) item row of each full-ID key (level_keys[L] order).
    """

    def __init__(self, semantic_ids: torch.Tensor, codebook_sizes: tuple[int, ...]):
        semantic_ids = torch.as_tensor(semantic_ids, dtype=torch.int64)
        space = 1
        for size in codebook_sizes:
            space *= int(size)
        if space >= 2 ** 62:
            raise ValueError(f"codebook sizes {list(codebook_sizes)} span {space} IDs, too many for int64 prefix keys.")
        if semantic_ids.ndim != 2 or semantic_ids.shape[1] != len(codebook_sizes):
            raise ValueError(f"semantic ids of shape {tuple(semantic_ids.shape)} do not match "
                             f"{len(codebook_sizes)} codebook sizes.")
        self.codebook_sizes = tuple(int(k) for k in codebook_sizes)
        self.level_keys, self.item_node, self.subtree_size = [], [], []
        keys = torch.zeros(len(semantic_ids), dtype=torch.int64, device=semantic_ids.device)
        for level, size in enumerate(self.codebook_sizes):
            keys = keys * size + semantic_ids[:, level]
            unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
            self.level_keys.append(unique)
            self.item_node.append(inverse)
            self.subtree_size.append(torch.bincount(inverse, minlength=len(unique)))
        if len(self.level_keys[-1]) != len(semantic_ids):
            raise ValueError(f"semantic ids are not unique: {len(semantic_ids)} items share "
                             f"{len(self.level_keys[-1])} full IDs.")
        self.leaf_item = torch.empty_like(self.item_node[-1])
        self.leaf_item[self.item_node[-1]] = torch.arange(len(semantic_ids), device=semantic_ids.device)

    @property
    def n_items(self) -> int:
        return len(self.leaf_item)

    def to(self, device: torch.device | str) -> "SemanticIdTrie":
        """Move every table to `device` (in place); returns self."""
        for tables in (self.level_keys, self.item_node, self.subtree_size):
            tables[:] = [t.to(device) for t in tables]
        self.leaf_item = self.leaf_item.to(device)
        return self

    def lookup(self, level: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys of length level+1 (any shape) -> (node index, exists) of the same shape."""
        table = self.level_keys[level]
        node = torch.searchsorted(table, keys.reshape(-1)).clamp_(max=len(table) - 1).view_as(keys)
        return node, table[node] == keys

    def seen_counts(self, seen: torch.Tensor) -> list[torch.Tensor]:
        """seen (B, N) bool -> per level (B, n_nodes_l) int32: seen items below each prefix."""
        counts = []
        for level, nodes in enumerate(self.item_node):
            index = nodes.expand(len(seen), -1)
            zeros = torch.zeros(len(seen), len(self.level_keys[level]), dtype=torch.int32, device=seen.device)
            counts.append(zeros.scatter_add_(1, index, seen.to(torch.int32)))
        return counts


@dataclass
class BeamResult:
    """Decoded IDs, best first.

    items:  (B, K) int64 item rows, NO_ITEM (-1) where the ID is not a real item or no beam survived.
    codes:  (B, K, L+1) int64 generated semantic IDs.
    scores: (B, K) float32 summed log-probabilities (-inf for dead beams).
    prefix_scores: (B, K, L+1) the sum after each level: [..., l] is the log-probability of the first l+1
            codes (`scores` is the last column).
    """

    items: torch.Tensor
    codes: torch.Tensor
    scores: torch.Tensor
    prefix_scores: torch.Tensor | None = None


@torch.no_grad()
def beam_search(model: Tiger, src_tokens: torch.Tensor, trie: SemanticIdTrie, beam_width: int = 20,
                top_k: int = 10, seen: torch.Tensor | None = None, constrained: bool = True,
                cache: bool = True) -> BeamResult:
    """Generate the top_k semantic IDs for each encoder input.

    src_tokens: (B, S) encoder inputs.
    seen:       (B, N) bool, items to exclude (the user's input history); only with constrained=True.
    constrained=False decodes without the trie (only each level's code slice), to measure how
    often a free decoder invents IDs that are no item (`items` is then NO_ITEM).
    cache=True decodes incrementally (`Tiger.decode_step`): the encoder memory's keys/values are
    projected once per user and each level feeds one new token per beam; cache=False re-decodes the
    whole prefix at every level (the reference; same items, scores equal to float rounding, tested).
    """
    if top_k > beam_width:
        raise ValueError(f"top_k = {top_k} needs beam_width >= top_k, got beam_width = {beam_width}.")
    if seen is not None and not constrained:
        raise ValueError("excluding seen items needs the trie: pass constrained=True.")
    batch, width, device = src_tokens.shape[0], beam_width, src_tokens.device
    memory, keep = model.encode(src_tokens)
    seen_counts = trie.seen_counts(seen) if seen is not None else None

    codes = torch.zeros(batch, width, 0, dtype=torch.int64, device=device)
    prefix_scores = torch.zeros(batch, width, 0, device=device)
    keys = torch.zeros(batch, width, dtype=torch.int64, device=device)
    # Every user starts with one live beam (the root); the others are dead copies.
    scores = torch.full((batch, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    state = model.start_decoding(memory, keep) if cache else None
    beam_rows = torch.arange(batch, device=device)[:, None] * width
    for level, size in enumerate(trie.codebook_sizes):
        if cache:
            hidden = model.decode_step(state, codes[:, :, -1].reshape(-1) if level else None, batch * width)
            log_probs = model.level_logits(hidden, level).float().log_softmax(-1).view(batch, width, size)
        else:
            log_probs = model.next_level_log_probs(memory, keep, codes.view(batch * width, level)).view(batch, width, size)
        candidate_keys = keys[:, :, None] * size + torch.arange(size, device=device)
        candidate_scores = scores[:, :, None] + log_probs
        if constrained:
            allowed = _allowed_children(trie, level, candidate_keys, seen_counts)
            candidate_scores = candidate_scores.masked_fill(~allowed, float("-inf"))
        scores, flat_index = candidate_scores.view(batch, width * size).topk(width, dim=1)
        parent = flat_index // size
        codes = torch.cat([codes.gather(1, parent[:, :, None].expand(-1, -1, level)),
                           (flat_index % size)[:, :, None]], dim=2)
        prefix_scores = torch.cat([prefix_scores.gather(1, parent[:, :, None].expand(-1, -1, level)),
                                   scores[:, :, None]], dim=2)
        keys = candidate_keys.view(batch, width * size).gather(1, flat_index)
        if cache:
            state.reorder((beam_rows + parent).reshape(-1))

    node, exists = trie.lookup(len(trie.codebook_sizes) - 1, keys)
    items = torch.where(exists & (scores > float("-inf")), trie.leaf_item[node], NO_ITEM)
    return BeamResult(items=items[:, :top_k], codes=codes[:, :top_k], scores=scores[:, :top_k],
                      prefix_scores=prefix_scores[:, :top_k])


def _allowed_children(trie: SemanticIdTrie, level: int, candidate_keys: torch.Tensor,
                      seen_counts: list[torch.Tensor] | None) -> torch.Tensor:
    """(B, W, K) bool: the prefix exists and (if seen_counts) still has an unseen item below it."""
    node, allowed = trie.lookup(level, candidate_keys)
    if seen_counts is not None:
        batch = candidate_keys.shape[0]
        seen_below = seen_counts[level].gather(1, node.view(batch, -1)).view_as(node)
        allowed &= trie.subtree_size[level][node] > seen_below
    return allowed


@torch.no_grad()
def exhaustive_item_scores(model: Tiger, src_tokens: torch.Tensor, semantic_ids: torch.Tensor,
                           chunk_items: int = 4096) -> torch.Tensor:
    """Reference scorer: (B, N) sum of teacher-forced per-level log-probs of every item's full ID.

    Costs B*N decoder passes; for tests and small catalogues only.
    """
    return exhaustive_level_log_probs(model, src_tokens, semantic_ids, chunk_items).sum(2)


@torch.no_grad()
def exhaustive_level_log_probs(model: Tiger, src_tokens: torch.Tensor, semantic_ids: torch.Tensor,
                               chunk_items: int = 4096) -> torch.Tensor:
    """(B, N, L+1) teacher-forced log-prob of each level's code of every item's full ID (float32), each
    level's softmax over its whole codebook; their sum is `exhaustive_item_scores`, and
    `renormalise_over_trie` turns them into the trie-constrained distribution. Costs B*N decoder passes."""
    memory, keep = model.encode(src_tokens)
    batch, n_items = src_tokens.shape[0], semantic_ids.shape[0]
    columns = []
    for start in range(0, n_items, chunk_items):
        ids = semantic_ids[start:start + chunk_items]
        targets = ids.repeat(batch, 1)  # rows [b*n, (b+1)*n) score every item for input b
        hidden = model.decode(memory, keep, targets[:, :-1])
        per_level = [model.level_logits(hidden[:, level], level).float().log_softmax(-1)
                     .gather(1, targets[:, level:level + 1]).squeeze(1) for level in range(ids.shape[1])]
        columns.append(torch.stack(per_level, 1).view(batch, len(ids), ids.shape[1]))
    return torch.cat(columns, dim=1)


@torch.no_grad()
def item_log_likelihood(model: Tiger, src_tokens: torch.Tensor, target_codes: torch.Tensor,
                        trie: SemanticIdTrie) -> torch.Tensor:
    """log p(target item | input) with each level locally renormalised over the real IDs: (B, S), (B, L+1) -> (B,).

    At each level the model's logits are renormalised over the children that exist below the
    target's prefix (the distribution of trie-constrained sampling), so exp of this over the whole
    catalogue sums to 1 for every input: a proper distribution over items, comparable with a
    popularity or SASRec likelihood. A level whose prefix has one child only (most collision codes)
    adds 0 nats. Beam search ranks by the unrenormalised sum (module docstring): this is a
    diagnostic, not the ranking. float32 output; under bf16 autocast the hidden states are bf16.
    """
    memory, keep = model.encode(src_tokens)
    hidden = model.decode(memory, keep, target_codes[:, :-1])
    total = torch.zeros(len(target_codes), dtype=torch.float32, device=target_codes.device)
    prefix = torch.zeros(len(target_codes), dtype=torch.int64, device=target_codes.device)
    for level, size in enumerate(trie.codebook_sizes):
        _, exists = trie.lookup(level, prefix[:, None] * size + torch.arange(size, device=prefix.device))
        log_probs = model.level_logits(hidden[:, level], level).masked_fill(~exists, float("-inf")).log_softmax(-1)
        total += log_probs.gather(1, target_codes[:, level:level + 1]).squeeze(1)
        prefix = prefix * size + target_codes[:, level]
    return total


def renormalise_over_trie(trie: SemanticIdTrie, level_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-level log-probs (B, N, L+1) of every item of `trie` (columns in item order) -> the same, each level
    renormalised over the children that exist below the item's prefix.

    Their sum over levels is the log-probability of the item under trie-constrained generation (the
    distribution of `item_log_likelihood`, here for all of a trie's items at once): it sums to 1 over the
    trie's items for every input. Items sharing a prefix share that prefix's level values, as any decoder
    gives them.
    """
    batch, n_items, n_levels = level_log_probs.shape
    if n_items != trie.n_items or n_levels != len(trie.codebook_sizes):
        raise ValueError(f"level log-probs of shape {tuple(level_log_probs.shape)} do not match a trie of "
                         f"{trie.n_items} items and {len(trie.codebook_sizes)} levels.")
    out = torch.empty_like(level_log_probs)
    for level in range(n_levels):
        node = trie.item_node[level]
        n_nodes = len(trie.level_keys[level])
        some_item = torch.empty(n_nodes, dtype=torch.int64, device=node.device)
        some_item[node] = torch.arange(n_items, device=node.device)
        node_values = level_log_probs[:, some_item, level]                               # (B, nodes)
        parent = trie.item_node[level - 1][some_item] if level else torch.zeros_like(some_item)
        index = parent.expand(batch, -1)
        n_parents = int(parent.max()) + 1
        peak = torch.full((batch, n_parents), float("-inf"), device=node_values.device, dtype=node_values.dtype)
        peak = peak.scatter_reduce(1, index, node_values, "amax")
        total = torch.zeros_like(peak).scatter_add(1, index, (node_values - peak.gather(1, index)).exp())
        log_norm = peak + total.log()
        out[:, :, level] = level_log_probs[:, :, level] - log_norm[:, parent[node]]
    return out
