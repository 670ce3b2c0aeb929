"""TIGER: an encoder-decoder transformer that generates the next item's semantic ID (Rajput et al. 2023).

The encoder reads [user token, semantic-ID tokens of the last H items]; the decoder starts from BOS
and emits one code per level (the collision column included). Sizes follow T5 as in the paper
(section 4.1): residual width `embed_dim` (d_model 128), attention inner width `attn_dim`
(6 heads x 64 = 384), MLP 1024, 4 encoder + 4 decoder layers, dropout 0.1. Unlike
torch.nn.Transformer, attention width and residual width are independent, as in T5.

`causal_encoder=True` is this repository's option, not the paper's: encoder tokens of history item j
attend only to items <= j (and the user token). Then one encoder pass serves several targets of a
window (`window_loss`): the target after item k cross-attends to items < k only, so a window of H
items trains up to H targets for one encoder pass instead of one.

Pure torch: no I/O, no printing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.sequences import BOS_TOKEN, N_SPECIAL_TOKENS, PAD_TOKEN, Vocabulary


class Attention(nn.Module):
    """Multi-head attention from a (B, T, embed_dim) query stream to a (B, S, embed_dim) context."""

    def __init__(self, embed_dim: int, attn_dim: int, n_heads: int, dropout: float):
        super().__init__()
        if attn_dim % n_heads:
            raise ValueError(f"attn_dim {attn_dim} must be a multiple of n_heads {n_heads}.")
        self.n_heads = n_heads
        self.dropout = dropout
        self.query = nn.Linear(embed_dim, attn_dim)
        self.key_value = nn.Linear(embed_dim, 2 * attn_dim)
        self.out = nn.Linear(attn_dim, embed_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """x (R, T, E), context (B, S, E) -> (R, T, E).

        mask: bool, True = attend, broadcastable to (B, 1, G*T, S) (see `context_mask`).
        R may be a multiple G of B: then rows [b*G, (b+1)*G) of x (the beams of one user) all attend
        to context row b, which is projected once instead of G times (no causal mask then).
        """
        return self.attend(x, *self.project_context(context), mask=mask, causal=causal)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context (B, S, E): two (B, heads, S, attn_dim / heads) tensors."""
        k, v = self.key_value(context).view(context.shape[0], context.shape[1], 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """x (R, T, E) attends to projected keys/values (B, heads, S, d) -> (R, T, E); R = G*B as in `forward`."""
        rows, length, width = x.shape
        batch = k.shape[0]
        group = rows // batch
        if group * batch != rows or (group > 1 and causal):
            raise ValueError(f"{rows} query rows cannot share {batch} context rows{' causally' if causal else ''}.")
        q = self.query(x.reshape(batch, group * length, width)).view(batch, group * length, self.n_heads, -1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(rows, length, -1))


def context_mask(keep: torch.Tensor, query_length: int) -> torch.Tensor:
    """Attention mask from a context keep mask, in the layout `Attention` expects.

    keep (B, S): every query row of input b sees the same context tokens -> (B, 1, 1, S).
    keep (B, G, S): query row g of input b (R = B*G rows of `query_length` tokens) has its own
    context tokens -> (B, 1, G*query_length, S).
    """
    if keep.dim() == 2:
        return keep[:, None, None, :]
    batch, group, length = keep.shape
    return keep[:, :, None, :].expand(batch, group, query_length, length).reshape(batch, 1, group * query_length, length)


class FeedForward(nn.Sequential):
    """Position-wise MLP embed_dim -> mlp_dim -> embed_dim."""

    def __init__(self, embed_dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(embed_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, embed_dim))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP block."""

    def __init__(self, embed_dim: int, attn_dim: int, mlp_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm_attn, self.norm_mlp = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attn = Attention(embed_dim, attn_dim, n_heads, dropout)
        self.mlp = FeedForward(embed_dim, mlp_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention + cross-attention + MLP block."""

    def __init__(self, embed_dim: int, attn_dim: int, mlp_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(embed_dim) for _ in range(3))
        self.self_attn = Attention(embed_dim, attn_dim, n_heads, dropout)
        self.cross_attn = Attention(embed_dim, attn_dim, n_heads, dropout)
        self.mlp = FeedForward(embed_dim, mlp_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, h, causal=True))
        x = x + self.drop(self.cross_attn(self.norm_cross(x), memory, memory_mask))
        return x + self.drop(self.mlp(self.norm_mlp(x)))

    def step(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
             memory_kv: tuple[torch.Tensor, torch.Tensor], memory_mask: torch.Tensor):
        """One new token per row: x (R, 1, E) -> (R, 1, E) and the self-attention keys/values (R, heads, t+1, d)
        of the tokens so far (`past` holds those of the t earlier ones; the new token attends to all of them
        and itself, which is the causal mask's last row). memory_kv: `Attention.project_context` of the memory."""
        h = self.norm_self(x)
        k, v = self.self_attn.project_context(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.drop(self.self_attn.attend(h, k, v))
        x = x + self.drop(self.cross_attn.attend(self.norm_cross(x), *memory_kv, mask=memory_mask))
        return x + self.drop(self.mlp(self.norm_mlp(x))), (k, v)


@dataclass
class DecoderCache:
    """The state of incremental decoding (`Tiger.start_decoding`, `Tiger.decode_step`) for R = G*B rows.

    memory_kv:   per decoder layer, the cross-attention keys and values of the encoder memory,
                 (B, heads, S, d) each, projected once for every level and beam.
    memory_mask: (B, 1, 1, S) bool, the memory tokens that are not padding.
    self_kv:     per decoder layer, keys and values (R, heads, t, d) of the t tokens decoded so far.
    """

    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]
    memory_mask: torch.Tensor
    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    length: int = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row rows[r] of the decoded tokens as row r (beam search's surviving parents), in place."""
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]


class Tiger(nn.Module):
    """Encoder-decoder over semantic-ID tokens (token layout: modules.sequences).

    vocab:       token slices (codebook sizes from the semantic-ID file, user buckets).
    max_history: items per encoder input (H); the encoder reads 1 + H*(L+1) tokens.
    n_layers:    total transformer layers, split evenly: n_layers/2 encoder + n_layers/2 decoder.
    causal_encoder: history item j's tokens see items <= j only (needed by `window_loss` with
                 several targets per window; the paper's encoder is bidirectional, the default).
    """

    def __init__(self, vocab: Vocabulary, max_history: int, embed_dim: int = 128, attn_dim: int = 384,
                 n_heads: int = 6, mlp_dim: int = 1024, n_layers: int = 8, dropout: float = 0.1,
                 causal_encoder: bool = False):
        super().__init__()
        if n_layers < 2 or n_layers % 2:
            raise ValueError(f"n_layers = {n_layers} must be even (half encoder, half decoder layers).")
        self.vocab = vocab
        self.max_history = max_history
        n_levels = vocab.n_levels
        self.token_embedding = nn.Embedding(vocab.size, embed_dim, padding_idx=PAD_TOKEN)
        self.encoder_position = nn.Embedding(1 + max_history * n_levels, embed_dim)
        self.decoder_position = nn.Embedding(n_levels, embed_dim)
        layer_args = (embed_dim, attn_dim, mlp_dim, n_heads, dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(n_layers // 2))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(n_layers // 2))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.embed_drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, vocab.n_code_tokens)
        self.register_buffer("level_offsets", torch.as_tensor(vocab.level_offsets), persistent=False)
        # History slot of each encoder token: -1 for the user token, j for the codes of history item j.
        slots = torch.arange(max_history).repeat_interleave(n_levels)
        self.register_buffer("encoder_slots", torch.cat([torch.tensor([-1]), slots]), persistent=False)
        self.causal_encoder = causal_encoder

    @property
    def src_length(self) -> int:
        """Encoder input length 1 + H*(L+1)."""
        return self.encoder_position.num_embeddings

    def encode(self, src_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src_tokens (B, S) -> memory (B, S, E) and keep mask (B, S) bool (False on PAD)."""
        if src_tokens.shape[1] != self.src_length:
            raise ValueError(f"encoder input has {src_tokens.shape[1]} tokens, the model expects {self.src_length} "
                             f"(1 user token + max_history {self.max_history} x {self.vocab.n_levels} codes).")
        keep = src_tokens != PAD_TOKEN
        mask = context_mask(keep, 1)
        if self.causal_encoder:  # (B, 1, S, S): slot of the key <= slot of the query
            mask = mask & (self.encoder_slots[None, :] <= self.encoder_slots[:, None])
        positions = torch.arange(src_tokens.shape[1], device=src_tokens.device)
        x = self.embed_drop(self.token_embedding(src_tokens) + self.encoder_position(positions))
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), keep

    def decode(self, memory: torch.Tensor, memory_keep: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """Hidden states after [BOS, prefix]: prefix_codes (R, l) level codes -> (R, l+1, E).

        memory (B, S, E) / memory_keep (B, S) from `encode`; R = G*B decodes G prefixes per input
        (rows [b*G, (b+1)*G) belong to input b), sharing its memory without copies. memory_keep may
        also be (B, G, S): row g of input b then sees only its own memory tokens (`window_loss`).
        """
        prefix_tokens = prefix_codes + N_SPECIAL_TOKENS + self.level_offsets[: prefix_codes.shape[1]]
        bos = torch.full((prefix_codes.shape[0], 1), BOS_TOKEN, dtype=torch.int64, device=prefix_codes.device)
        tokens = torch.cat([bos, prefix_tokens], dim=1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_drop(self.token_embedding(tokens) + self.decoder_position(positions))
        mask = context_mask(memory_keep, tokens.shape[1])
        for layer in self.decoder_layers:
            x = layer(x, memory, mask)
        return self.decoder_norm(x)

    def start_decoding(self, memory: torch.Tensor, memory_keep: torch.Tensor) -> DecoderCache:
        """A `DecoderCache` for `decode_step` from `encode`'s memory (B, S, E) and keep mask (B, S)."""
        return DecoderCache(memory_kv=[layer.cross_attn.project_context(memory) for layer in self.decoder_layers],
                            memory_mask=context_mask(memory_keep, 1), self_kv=[None] * len(self.decoder_layers))

    def decode_step(self, cache: DecoderCache, codes: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The hidden state (R, E) after one more decoder token, reusing every earlier one from `cache`.

        codes: (R,) the codes of level t-1 just chosen (None for the first step, whose input is BOS);
        rows: R, a multiple G of the memory's B (rows [b*G, (b+1)*G) belong to input b). Equals
        `decode(memory, keep, prefix)[:, -1]` for the prefix decoded so far (tested), at a fraction of the
        cost: the memory's keys/values and the earlier tokens' are not recomputed.
        """
        level = cache.length
        if level == 0:
            tokens = torch.full((rows,), BOS_TOKEN, dtype=torch.int64, device=cache.memory_mask.device)
        else:
            tokens = codes + N_SPECIAL_TOKENS + self.level_offsets[level - 1]
        x = self.embed_drop(self.token_embedding(tokens) + self.decoder_position.weight[level])[:, None, :]
        for index, layer in enumerate(self.decoder_layers):
            x, cache.self_kv[index] = layer.step(x, cache.self_kv[index], cache.memory_kv[index], cache.memory_mask)
        cache.length += 1
        return self.decoder_norm(x)[:, 0]

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """(..., E) hidden state at decoder position `level` -> (..., K_level) float32 logits of that level's codes.

        The head runs in float32 even under bf16 autocast: bf16 logits keep 8 mantissa bits, so nearby
        codes would tie and beam scores would be coarse; the head is small, so this costs little.
        """
        start = int(self.vocab.level_offsets[level])
        stop = start + self.vocab.codebook_sizes[level]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.head.weight[start:stop].float(), self.head.bias[start:stop].float())

    def next_level_log_probs(self, memory: torch.Tensor, memory_keep: torch.Tensor,
                             prefix_codes: torch.Tensor) -> torch.Tensor:
        """log p(code of level l | history, prefix) for prefix_codes (R, l) -> (R, K_l) float32 (R as in decode)."""
        hidden = self.decode(memory, memory_keep, prefix_codes)[:, -1]
        return self.level_logits(hidden, prefix_codes.shape[1]).float().log_softmax(-1)

    def sequence_log_probs(self, src_tokens: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced per-level log-probs: src (B, S), target codes (B, L+1) -> (B, L+1) float32."""
        memory, keep = self.encode(src_tokens)
        return self._teacher_forced(memory, keep, target_codes)

    def _teacher_forced(self, memory: torch.Tensor, memory_keep: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """(R, L+1) per-level log-probs of target_codes (R, L+1) given the memory (rows as in `decode`)."""
        hidden = self.decode(memory, memory_keep, target_codes[:, :-1])
        return torch.stack([self.level_logits(hidden[:, level], level).float().log_softmax(-1)
                            .gather(1, target_codes[:, level:level + 1]).squeeze(1)
                            for level in range(self.vocab.n_levels)], dim=1)

    def window_log_probs(self, src_tokens: torch.Tensor, target_codes: torch.Tensor,
                         visible_items: torch.Tensor) -> torch.Tensor:
        """Per-level log-probs of T targets per encoder window, from one encoder pass.

        src_tokens (B, S); target_codes (B, T, L+1); visible_items (B, T) int: target t is predicted
        from the user token and history slots 0..visible_items[b, t]-1 only (H = all of them; values
        < 0 mark absent targets, whose log-probs are meaningless). Returns (B, T, L+1) float32.
        Fewer than H visible items needs causal_encoder=True: a bidirectional encoder would carry the
        later slots, the target among them, into the visible ones.
        """
        batch, n_targets, n_levels = target_codes.shape
        if not self.causal_encoder and bool((visible_items >= 0).logical_and(visible_items < self.max_history).any()):
            raise ValueError("targets that see only part of the window need Tiger.causal_encoder = True "
                             "(with a bidirectional encoder the hidden later items leak into the visible ones).")
        memory, keep = self.encode(src_tokens)
        # (B, T, S): the user token (slot -1) is always visible, so no row is fully masked.
        row_keep = keep[:, None, :] & (self.encoder_slots < visible_items.clamp(min=0)[:, :, None])
        log_probs = self._teacher_forced(memory, row_keep, target_codes.reshape(batch * n_targets, n_levels))
        return log_probs.view(batch, n_targets, n_levels)

    def window_loss(self, src_tokens: torch.Tensor, target_codes: torch.Tensor, visible_items: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per code over the present targets (visible_items >= 0) of `window_log_probs`.

        Under DistributedDataParallel each rank divides by its own count of present targets, so ranks
        with fewer targets weigh theirs slightly more (counts differ only by users' oldest, partial windows).
        """
        log_probs = self.window_log_probs(src_tokens, target_codes, visible_items)
        present = (visible_items >= 0).to(log_probs.dtype)[:, :, None]
        return -(log_probs * present).sum() / (present.sum() * target_codes.shape[2]).clamp(min=1)

    def forward(self, src_tokens: torch.Tensor, target_codes: torch.Tensor,
                visible_items: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: mean over targets and levels of the cross-entropy of each target code.

        One target per input: src_tokens (B, S), target_codes (B, L+1) -> scalar (the paper's setup).
        Several: target_codes (B, T, L+1) with visible_items (B, T), see `window_loss`.
        """
        if target_codes.dim() == 2:
            return -self.sequence_log_probs(src_tokens, target_codes).mean()
        if visible_items is None:
            raise ValueError(f"target_codes of shape {tuple(target_codes.shape)} (several targets per input) need "
                             "visible_items (B, T): how many history slots each target may see.")
        return self.window_loss(src_tokens, target_codes, visible_items)
