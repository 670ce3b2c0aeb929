"""RQ-VAE: MLP encoder, residual quantizer, mirrored MLP decoder (TIGER, Rajput et al. 2023, section 3.1).

x (B, F) -> encoder -> z (B, D) -> residual quantizer -> z_q (B, D) -> decoder -> x_hat (B, F).
Loss = ||x - x_hat||^2 + codebook loss + commitment_weight * commitment loss.

fusion='concat' (TIGER) encodes the concatenation x itself. 'gated' and 'attention' first mix the feature
blocks an item has into one vector (B, fusion_dim) with `modules.fusion.BlockFusion`, then encode that; the
decoder still reconstructs x (B, F).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from modules.fusion import BlockFusion
from modules.quantizer import QuantizerOutput, ResidualQuantizer

FUSIONS = ("concat", "gated", "attention")


def mlp(widths: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers through `widths` with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RQVAEOutput(NamedTuple):
    """reconstruction (B, F); quantizer: see `QuantizerOutput`; losses: scalars (total = the optimised one)."""

    reconstruction: torch.Tensor
    quantizer: QuantizerOutput
    reconstruction_loss: torch.Tensor
    quantization_loss: torch.Tensor
    total_loss: torch.Tensor


class RQVAE(nn.Module):
    """Args:
        input_dim: F, width of the fused item features.
        embed_dim: D, width of the latent that is quantized (TIGER: 32).
        hidden_dims: encoder widths between F and D; the decoder mirrors them (TIGER: 512, 256, 128).
        codebook_size, n_levels, gradient, init, dead_code_steps: see `ResidualQuantizer`.
        commitment_weight: beta in front of the commitment loss (TIGER: 0.25).
        dropout: dropout after hidden activations.
        fusion: 'concat' (encode x as it is), 'gated' or 'attention' (see `modules.fusion.BlockFusion`).
        blocks: the block layout of x (`BlockSpec`s or their dicts), needed by 'gated' and 'attention' and
            ignored by 'concat'; train_rqvae.py derives it from blocks.json.
        fusion_dim: width of the block tokens and of the fused vector the encoder reads.
        block_dropout: training-only probability of hiding a present block (never all of an item's).
        fusion_heads: attention heads of 'attention'.

    With fusion='concat' the parameters, their initialisation and `config` are exactly those of the model
    before adaptive fusion existed, so its checkpoints load and resume unchanged.
    """

    def __init__(self, input_dim: int, embed_dim: int = 32, hidden_dims: Sequence[int] = (512, 256, 128),
                 codebook_size: int = 256, n_levels: int = 3, commitment_weight: float = 0.25,
                 gradient: str = "rotation", init: str = "kmeans", dead_code_steps: int = 100,
                 dropout: float = 0.0, fusion: str = "concat", blocks: Sequence | None = None,
                 fusion_dim: int = 64, block_dropout: float = 0.0, fusion_heads: int = 1):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"RQVAE.fusion must be one of {FUSIONS}, got {fusion!r}.")
        if fusion == "concat" and block_dropout:
            raise ValueError(f"RQVAE.block_dropout = {block_dropout} needs RQVAE.fusion = 'gated' or 'attention': "
                             f"'concat' has no blocks to drop.")
        if fusion != "concat" and not blocks:
            raise ValueError(f"RQVAE(fusion={fusion!r}) needs the block layout `blocks` of the input "
                             f"(train_rqvae.py passes it from item_features/blocks.json).")
        # Constructor arguments, saved in the checkpoint so the model can be rebuilt without gin.
        self.config = dict(input_dim=int(input_dim), embed_dim=int(embed_dim), hidden_dims=[int(h) for h in hidden_dims],
                           codebook_size=int(codebook_size), n_levels=int(n_levels),
                           commitment_weight=float(commitment_weight), gradient=gradient, init=init,
                           dead_code_steps=int(dead_code_steps), dropout=float(dropout))
        self.input_dim, self.embed_dim = int(input_dim), int(embed_dim)
        self.commitment_weight = float(commitment_weight)
        self.fusion = fusion
        widths = [self.input_dim, *hidden_dims, self.embed_dim]
        encoder_input = self.input_dim if fusion == "concat" else int(fusion_dim)
        self.encoder = mlp([encoder_input, *widths[1:]], dropout)
        self.decoder = mlp(widths[::-1], dropout)
        self.quantizer = ResidualQuantizer(n_levels, codebook_size, self.embed_dim, gradient=gradient,
                                           init=init, dead_code_steps=dead_code_steps)
        self.block_fusion: BlockFusion | None = None
        if fusion != "concat":
            self.block_fusion = BlockFusion(blocks, self.input_dim, fusion, int(fusion_dim), float(block_dropout),
                                            int(fusion_heads))
            self.config.update(fusion=fusion, blocks=[b.to_config() for b in self.block_fusion.blocks],
                               fusion_dim=int(fusion_dim), block_dropout=float(block_dropout),
                               fusion_heads=int(fusion_heads))

    @property
    def n_levels(self) -> int:
        return self.quantizer.n_levels

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, F) -> the latent z (B, D) that is quantized (through the block fusion, if any)."""
        return self.encoder(x if self.block_fusion is None else self.block_fusion(x).fused)

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        """x (B, F) -> reconstruction and losses."""
        quantized = self.quantizer(self.encode(x))
        reconstruction = self.decoder(quantized.quantized)
        reconstruction_loss = (reconstruction - x).pow(2).mean()
        quantization_loss = quantized.codebook_loss + self.commitment_weight * quantized.commitment_loss
        return RQVAEOutput(reconstruction, quantized, reconstruction_loss, quantization_loss,
                           reconstruction_loss + quantization_loss)

    @torch.no_grad()
    def semantic_codes(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Codes (N, L) int64 of x (N, F), computed in eval mode batch by batch (usage counters untouched)."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self.quantizer(self.encode(chunk)).codes for chunk in x.split(batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def block_weights(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """(N, n_blocks) weight each row of x (N, F) gives each block, in eval mode (no block dropout): 0 on
        the blocks a row lacks, summing to 1 over those it has. Only for fusion 'gated' or 'attention'."""
        if self.block_fusion is None:
            raise ValueError("block_weights needs RQVAE.fusion = 'gated' or 'attention'; 'concat' weighs no blocks.")
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self.block_fusion(chunk).weights for chunk in x.split(batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Reconstructions (N, F) of x (N, F) in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(chunk).reconstruction for chunk in x.split(batch_size)])
        finally:
            self.train(was_training)
