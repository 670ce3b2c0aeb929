"""Decoder-only generative retrieval over semantic IDs (this repository's layouts, not the paper's).

TigerLM reads the token stream (below); TigerItemLM reads one position per item and generates each next
item's codes with a small code head (its class docstring). Both keep Tiger's interface.

The paper's TIGER (modules.tiger) encodes the history and decodes one target's codes per decoder pass.
TigerLM reads one causal stream instead,

    [user token, codes of item 1, codes of item 2, ..., codes of item H+1]

and predicts every token of every item from the tokens before it, as a language model does (and as
SASRec does at item level). One pass over a window of H+1 items trains the codes of its last s items
(`targets_per_window`, up to H), each from the items before it, with no separate decoder.

Inference is the same model: the history's H items fill the first 1 + H*(L+1) positions (left-padded,
so the latest item always sits at the same position, as the last target of a training window does),
and the next item's codes are decoded after them with a key/value cache (`encode`, `start_decoding`,
`decode_step`), so `modules.beam_search` drives TigerLM and Tiger alike.

Attention is causal only, with no padding mask: PAD tokens are ordinary (content-free) inputs that a
position may attend to, which is what keeps `scaled_dot_product_attention` on its fused causal kernel.
They carry no information about any item, and training and inference see them the same way.
Attention probabilities are not dropped (only residual, MLP and embedding dropout): dropout inside
attention would also take the kernel off its fused path.

Pure torch: no I/O, no printing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.sequences import N_SPECIAL_TOKENS, Vocabulary
from modules.tiger import Attention, FeedForward


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP; also returns the layer's keys and values (for the cache)."""

    def __init__(self, embed_dim: int, attn_dim: int, mlp_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm_attn, self.norm_mlp = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attn = Attention(embed_dim, attn_dim, n_heads, dropout=0.0)
        self.mlp = FeedForward(embed_dim, mlp_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h = self.norm_attn(x)
        k, v = self.attn.project_context(h)
        x = x + self.drop(self.attn.attend(h, k, v, causal=True))
        return x + self.drop(self.mlp(self.norm_mlp(x))), (k, v)

    def extend(self, x: torch.Tensor, prefix_kv: tuple[torch.Tensor, torch.Tensor],
               past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """t new tokens per row after a shared prefix: x (R, t, E) -> (R, t, E) and the rows' own keys/values.

        prefix_kv: (B, heads, S, d) keys/values of the B prefixes (R = G*B rows, rows [b*G, (b+1)*G) continue
        prefix b, which is never copied); past: (R, heads, t0, d) of the t0 tokens each row fed before.
        Each new token attends to its prefix, the row's earlier tokens and itself (causal).
        """
        h = self.norm_attn(x)
        k, v = self.attn.project_context(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.drop(self.attn.out(_attend_after_prefix(self.attn, h, prefix_kv, (k, v))))
        return x + self.drop(self.mlp(self.norm_mlp(x))), (k, v)


def _attend_after_prefix(attn: Attention, h: torch.Tensor, prefix_kv: tuple[torch.Tensor, torch.Tensor],
                         own_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention of h (R, t, E) to [shared prefix (B, heads, S, d), own tokens (R, heads, t_all, d)] -> (R, t, heads*d).

    The last t of the t_all own tokens are h's; token i of them sees own tokens 0 .. t_all - t + i.
    One softmax over prefix and own scores, written out because the prefix is shared by G rows.
    """
    rows, length, _ = h.shape
    prefix_k, prefix_v = prefix_kv
    own_k, own_v = own_kv
    batch, heads, prefix_length, dim = prefix_k.shape
    group = rows // batch
    q = attn.query(h).view(rows, length, heads, dim).transpose(1, 2) * dim ** -0.5     # (R, heads, t, d)
    grouped = q.reshape(batch, group, heads, length, dim).transpose(1, 2).reshape(batch, heads, group * length, dim)
    prefix_scores = (grouped @ prefix_k.transpose(-1, -2)).view(batch, heads, group, length, prefix_length)
    prefix_scores = prefix_scores.transpose(1, 2).reshape(rows, heads, length, prefix_length)
    own_scores = q @ own_k.transpose(-1, -2)                                             # (R, heads, t, t_all)
    total = own_k.shape[2]
    visible = torch.arange(total, device=h.device)[None, :] <= (total - length + torch.arange(length, device=h.device))[:, None]
    own_scores = own_scores.masked_fill(~visible, float("-inf"))
    weights = torch.cat([prefix_scores, own_scores], dim=-1).float().softmax(-1).to(q.dtype)
    prefix_weights = weights[..., :prefix_length].reshape(batch, group, heads, length, prefix_length)
    prefix_weights = prefix_weights.transpose(1, 2).reshape(batch, heads, group * length, prefix_length)
    from_prefix = (prefix_weights @ prefix_v).view(batch, heads, group, length, dim).transpose(1, 2)
    y = from_prefix.reshape(rows, heads, length, dim) + weights[..., prefix_length:] @ own_v
    return y.transpose(1, 2).reshape(rows, length, heads * dim)


@dataclass
class HistoryState:
    """`TigerLM.encode`'s output: per layer the keys/values (B, heads, S, d) of the B history streams, and
    the final hidden state (B, E) of each stream's last token (the one that predicts the next item's first code)."""

    layer_kv: list[tuple[torch.Tensor, torch.Tensor]]
    last_hidden: torch.Tensor


@dataclass
class StreamCache:
    """Incremental decoding state of TigerLM for R = G*B rows (`start_decoding`, `decode_step`)."""

    history: HistoryState
    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    length: int = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row rows[r] of the decoded tokens as row r (beam search's surviving parents), in place."""
        self.self_kv = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.self_kv]


class _DecoderOnly(nn.Module):
    """What TigerLM and TigerItemLM share: the per-level head, next-level log-probs and the training loss.
    Subclasses define `decode`, `window_log_probs`, `max_history`, `vocab` and `head`."""

    causal_encoder = True  # every history item sees only earlier ones: windows of several targets are allowed

    def __init__(self, vocab: Vocabulary, max_history: int, n_positions: int, embed_dim: int, attn_dim: int,
                 n_heads: int, mlp_dim: int, n_layers: int, dropout: float):
        """The token and position embeddings and the causal stack; subclasses add their heads after these
        (creation order fixes the seeded initial weights)."""
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers = {n_layers} must be >= 1.")
        self.vocab = vocab
        self.max_history = max_history
        self.token_embedding = nn.Embedding(vocab.size, embed_dim, padding_idx=0)
        self.position = nn.Embedding(n_positions, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, attn_dim, mlp_dim, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.embed_drop = nn.Dropout(dropout)
        self.register_buffer("level_offsets", torch.as_tensor(vocab.level_offsets), persistent=False)

    @property
    def src_length(self) -> int:
        """Input token length 1 + H*(L+1), the layout every model here reads."""
        return 1 + self.max_history * self.vocab.n_levels

    def _check_input(self, src_tokens: torch.Tensor) -> None:
        if src_tokens.shape[1] != self.src_length:
            raise ValueError(f"input has {src_tokens.shape[1]} tokens, the model expects {self.src_length} "
                             f"(1 user token + max_history {self.max_history} x {self.vocab.n_levels} codes).")

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """(..., E) -> (..., K_level) float32 logits of that level's codes (the head in float32, as in Tiger)."""
        start = int(self.vocab.level_offsets[level])
        stop = start + self.vocab.codebook_sizes[level]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.head.weight[start:stop].float(), self.head.bias[start:stop].float())

    def next_level_log_probs(self, history: HistoryState, keep: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """log p(code of level l | history, prefix) for prefix_codes (R, l) -> (R, K_l) float32."""
        hidden = self.decode(history, keep, prefix_codes)[:, -1]
        return self.level_logits(hidden, prefix_codes.shape[1]).log_softmax(-1)

    def sequence_log_probs(self, src_tokens: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced per-level log-probs of the next item: src (B, S), target codes (B, L+1) -> (B, L+1)."""
        visible = torch.full((len(src_tokens), 1), self.max_history, device=src_tokens.device)
        return self.window_log_probs(src_tokens, target_codes[:, None], visible)[:, 0]

    def forward(self, src_tokens: torch.Tensor, target_codes: torch.Tensor,
                visible_items: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss, as Tiger.forward: one target (B, L+1), or T targets (B, T, L+1) with visible_items (B, T)."""
        if target_codes.dim() == 2:
            return -self.sequence_log_probs(src_tokens, target_codes).mean()
        if visible_items is None:
            raise ValueError(f"target_codes of shape {tuple(target_codes.shape)} (several targets per input) need "
                             "visible_items (B, T): which targets are present.")
        log_probs = self.window_log_probs(src_tokens, target_codes, visible_items)
        present = (visible_items >= 0).to(log_probs.dtype)[:, :, None]
        return -(log_probs * present).sum() / (present.sum() * target_codes.shape[2]).clamp(min=1)


class TigerLM(_DecoderOnly):
    """Decoder-only generative retrieval over semantic-ID tokens (token layout: modules.sequences).

    vocab:       token slices (codebook sizes from the semantic-ID file, user buckets).
    max_history: H, history items per input; the input stream is 1 + H*(L+1) tokens (as Tiger's encoder's).
    n_layers:    transformer blocks (all in one causal stack).
    Sizes as in Tiger: residual width embed_dim, attention width attn_dim (n_heads heads), MLP mlp_dim.
    """

    def __init__(self, vocab: Vocabulary, max_history: int, embed_dim: int = 128, attn_dim: int = 384,
                 n_heads: int = 6, mlp_dim: int = 1024, n_layers: int = 8, dropout: float = 0.1):
        # Positions: the history's tokens, then the next item's L+1 (a training window of H+1 items).
        super().__init__(vocab, max_history, 1 + (max_history + 1) * vocab.n_levels, embed_dim, attn_dim, n_heads,
                         mlp_dim, n_layers, dropout)
        self.head = nn.Linear(embed_dim, vocab.n_code_tokens)

    def _code_tokens(self, codes: torch.Tensor, first_level: int = 0) -> torch.Tensor:
        """codes (..., l) of levels first_level.. -> their token ids."""
        return codes + N_SPECIAL_TOKENS + self.level_offsets[first_level:first_level + codes.shape[-1]]

    def _stream(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """tokens (B, T) from position 0 -> normed hidden states (B, T, E) and every layer's keys/values."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_drop(self.token_embedding(tokens) + self.position(positions))
        layer_kv = []
        for block in self.blocks:
            x, kv = block(x)
            layer_kv.append(kv)
        return self.norm(x), layer_kv

    def encode(self, src_tokens: torch.Tensor) -> tuple[HistoryState, torch.Tensor]:
        """src_tokens (B, S) -> the histories' `HistoryState` and a keep mask (B, S) (False on PAD; unused
        by attention, returned for the interface Tiger shares)."""
        self._check_input(src_tokens)
        hidden, layer_kv = self._stream(src_tokens)
        return HistoryState(layer_kv=layer_kv, last_hidden=hidden[:, -1]), src_tokens != 0

    def decode(self, history: HistoryState, keep: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """Hidden states that predict levels 0..l after a prefix: prefix_codes (R, l) -> (R, l+1, E).

        R = G*B: rows [b*G, (b+1)*G) continue history b (shared, not copied), as in Tiger.decode.
        """
        rows, length = prefix_codes.shape
        group = rows // history.last_hidden.shape[0]
        first = history.last_hidden.repeat_interleave(group, 0)[:, None]
        if length == 0:
            return first
        return torch.cat([first, self._extend(history, self._code_tokens(prefix_codes), [None] * len(self.blocks), 0)[0]], 1)

    def _extend(self, history: HistoryState, tokens: torch.Tensor, past: list, fed: int):
        """Feed tokens (R, t) after the history and `fed` earlier own tokens -> normed hidden (R, t, E), new own kv."""
        positions = self.src_length + fed + torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_drop(self.token_embedding(tokens) + self.position(positions))
        own = []
        for block, prefix_kv, block_past in zip(self.blocks, history.layer_kv, past):
            x, kv = block.extend(x, prefix_kv, block_past)
            own.append(kv)
        return self.norm(x), own

    def start_decoding(self, history: HistoryState, keep: torch.Tensor) -> StreamCache:
        """A `StreamCache` for `decode_step` from `encode`'s output."""
        return StreamCache(history=history, self_kv=[None] * len(self.blocks))

    def decode_step(self, cache: StreamCache, codes: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The hidden state (R, E) that predicts the next level, after feeding `codes` (R,) of the level just
        chosen (None at the first step: the history's last token predicts level 0). Equals
        `decode(history, keep, prefix)[:, -1]` for the prefix decoded so far (tested)."""
        level = cache.length
        cache.length += 1
        if level == 0:
            return cache.history.last_hidden.repeat_interleave(rows // cache.history.last_hidden.shape[0], 0)
        tokens = self._code_tokens(codes[:, None], level - 1)
        hidden, cache.self_kv = self._extend(cache.history, tokens, cache.self_kv, level - 1)
        return hidden[:, 0]

    def window_log_probs(self, src_tokens: torch.Tensor, target_codes: torch.Tensor,
                         visible_items: torch.Tensor) -> torch.Tensor:
        """Per-level log-probs of a window's last T items from one causal pass.

        src_tokens (B, S): the H items before the window's last target; target_codes (B, T, L+1): the window's
        last T items, oldest first (the first T-1 are src's last items, the last one follows src);
        visible_items (B, T): < 0 marks absent targets (their log-probs are meaningless), as in Tiger.
        Target t is predicted from the user token and the H-T+1+t items before it. Returns (B, T, L+1) float32.
        """
        self._check_input(src_tokens)
        batch, n_targets, n_levels = target_codes.shape
        if not 1 <= n_targets <= self.max_history:
            raise ValueError(f"{n_targets} targets per window: TigerLM trains 1..max_history ({self.max_history}).")
        hidden, _ = self._stream(torch.cat([src_tokens, self._code_tokens(target_codes[:, -1])], dim=1))
        # Token l of window item j (0-based, j = H for the last target) sits at 1 + j*(L+1) + l and is
        # predicted from the position before it.
        slots = self.max_history - n_targets + 1 + torch.arange(n_targets, device=src_tokens.device)
        predicting = slots[:, None] * n_levels + torch.arange(n_levels, device=src_tokens.device)   # (T, L+1)
        states = hidden[:, predicting.reshape(-1)].view(batch, n_targets, n_levels, -1)
        return torch.stack([self.level_logits(states[:, :, level], level).log_softmax(-1)
                            .gather(2, target_codes[:, :, level:level + 1]).squeeze(2)
                            for level in range(n_levels)], dim=2)



@dataclass
class ItemHistoryState:
    """`TigerItemLM.encode`'s output: the final hidden state (B, E) after each history's last item."""

    last_hidden: torch.Tensor


@dataclass
class CodePrefixCache:
    """Incremental decoding state of TigerItemLM for R = G*B rows: the running sum (R, E) of the chosen codes' embeddings."""

    history: ItemHistoryState
    prefix_sum: torch.Tensor | None = None
    length: int = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row rows[r] of the decoded prefixes as row r (beam search's surviving parents), in place."""
        if self.prefix_sum is not None:
            self.prefix_sum = self.prefix_sum[rows]


class TigerItemLM(_DecoderOnly):
    """Decoder-only generative retrieval with one stream position per item and a small per-item code head.

    The causal transformer reads [user token, item 1, ..., item H+1], each item the sum of its L+1 code-token
    embeddings (so items that share code prefixes share input parameters, as in TIGER); the hidden state h
    after item j predicts item j+1's codes one level at a time with a residual MLP head:
    level l reads h + level_l + the embeddings of the codes chosen at levels < l (the prefix, whose code
    tokens are level-specific, so the sum is unambiguous), as the depth transformer of RQ-Transformer does
    with attention. The stream is L+1 times shorter than TigerLM's, so a training pass costs about a quarter.
    Same interface as Tiger and TigerLM (`encode`, `decode`, `start_decoding`, `decode_step`, `level_logits`,
    `window_log_probs`, `forward`), so `modules.beam_search` and train_decoder drive it unchanged.
    """

    def __init__(self, vocab: Vocabulary, max_history: int, embed_dim: int = 128, attn_dim: int = 384,
                 n_heads: int = 6, mlp_dim: int = 1024, n_layers: int = 8, dropout: float = 0.1):
        # Positions: the user, H history items, the next item.
        super().__init__(vocab, max_history, max_history + 2, embed_dim, attn_dim, n_heads, mlp_dim, n_layers, dropout)
        self.level_embedding = nn.Embedding(vocab.n_levels, embed_dim)
        self.code_norm = nn.LayerNorm(embed_dim)
        self.code_mlp = FeedForward(embed_dim, mlp_dim, dropout)
        self.head_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab.n_code_tokens)

    def _item_stream(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1 + n*(L+1)) -> normed hidden states (B, 1 + n, E), one per stream position."""
        batch = tokens.shape[0]
        items = self.token_embedding(tokens[:, 1:].reshape(batch, -1, self.vocab.n_levels)).sum(2)
        x = torch.cat([self.token_embedding(tokens[:, :1]), items], dim=1)
        x = self.embed_drop(x + self.position(torch.arange(x.shape[1], device=tokens.device)))
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def _code_states(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """hidden (..., E), codes (..., l) of levels 0..l-1 -> (..., l+1, E) states that predict levels 0..l."""
        n_known = codes.shape[-1]
        embedded = self.token_embedding(codes + N_SPECIAL_TOKENS + self.level_offsets[:n_known])   # (..., l, E)
        prefix = torch.cat([torch.zeros_like(hidden)[..., None, :], embedded.cumsum(-2)], dim=-2)  # sums over levels < l
        return self._code_head(hidden[..., None, :] + prefix + self.level_embedding.weight[:n_known + 1])

    def _code_head(self, u: torch.Tensor) -> torch.Tensor:
        return self.head_norm(u + self.code_mlp(self.code_norm(u)))

    def encode(self, src_tokens: torch.Tensor) -> tuple[ItemHistoryState, torch.Tensor]:
        """src_tokens (B, S) -> the state after each history's last item and a keep mask (B, S) (interface only)."""
        self._check_input(src_tokens)
        return ItemHistoryState(last_hidden=self._item_stream(src_tokens)[:, -1]), src_tokens != 0

    def decode(self, history: ItemHistoryState, keep: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """prefix_codes (R, l) -> (R, l+1, E) states that predict levels 0..l (R = G*B, as in Tiger.decode)."""
        group = prefix_codes.shape[0] // history.last_hidden.shape[0]
        return self._code_states(history.last_hidden.repeat_interleave(group, 0), prefix_codes)

    def start_decoding(self, history: ItemHistoryState, keep: torch.Tensor) -> CodePrefixCache:
        return CodePrefixCache(history=history)

    def decode_step(self, cache: CodePrefixCache, codes: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The state (R, E) that predicts the next level after `codes` (R,) of the level just chosen (None first)."""
        level = cache.length
        cache.length += 1
        hidden = cache.history.last_hidden.repeat_interleave(rows // cache.history.last_hidden.shape[0], 0)
        if level == 0:
            cache.prefix_sum = torch.zeros_like(hidden)
        else:
            cache.prefix_sum = cache.prefix_sum + self.token_embedding(codes + N_SPECIAL_TOKENS + self.level_offsets[level - 1])
        return self._code_head(hidden + cache.prefix_sum + self.level_embedding.weight[level])

    def window_log_probs(self, src_tokens: torch.Tensor, target_codes: torch.Tensor,
                         visible_items: torch.Tensor) -> torch.Tensor:
        """Per-level log-probs of a window's last T items from one causal pass (arguments as TigerLM's)."""
        self._check_input(src_tokens)
        batch, n_targets, n_levels = target_codes.shape
        if not 1 <= n_targets <= self.max_history:
            raise ValueError(f"{n_targets} targets per window: TigerItemLM trains 1..max_history ({self.max_history}).")
        last = target_codes[:, -1] + N_SPECIAL_TOKENS + self.level_offsets
        hidden = self._item_stream(torch.cat([src_tokens, last], dim=1))          # (B, H+2, E)
        # Window item s (0-based; s = H for the last target) is predicted from stream position s.
        slots = self.max_history - n_targets + 1 + torch.arange(n_targets, device=src_tokens.device)
        states = self._code_states(hidden[:, slots], target_codes[:, :, :-1])     # (B, T, L+1, E)
        return torch.stack([self.level_logits(states[:, :, level], level).log_softmax(-1)
                            .gather(2, target_codes[:, :, level:level + 1]).squeeze(2)
                            for level in range(n_levels)], dim=2)
