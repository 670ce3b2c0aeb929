"""RQ-VAE: MLP encoder, residual quantizer, mirrored MLP decoder (TIGER, Rajput et al. 2023, section 3.1).

x (B, F) -> encoder -> z (B, D) -> residual quantizer -> z_q (B, D) -> decoder -> x_hat (B, F).
Loss = ||x - x_hat||^2 + codebook loss + commitment_weight * commitment loss.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from modules.quantizer import QuantizerOutput, ResidualQuantizer


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
    """

    def __init__(self, input_dim: int, embed_dim: int = 32, hidden_dims: Sequence[int] = (512, 256, 128),
                 codebook_size: int = 256, n_levels: int = 3, commitment_weight: float = 0.25,
                 gradient: str = "rotation", init: str = "kmeans", dead_code_steps: int = 100,
                 dropout: float = 0.0):
        super().__init__()
        # Constructor arguments, saved in the checkpoint so the model can be rebuilt without gin.
        self.config = dict(input_dim=int(input_dim), embed_dim=int(embed_dim), hidden_dims=[int(h) for h in hidden_dims],
                           codebook_size=int(codebook_size), n_levels=int(n_levels),
                           commitment_weight=float(commitment_weight), gradient=gradient, init=init,
                           dead_code_steps=int(dead_code_steps), dropout=float(dropout))
        self.input_dim, self.embed_dim = int(input_dim), int(embed_dim)
        self.commitment_weight = float(commitment_weight)
        widths = [self.input_dim, *hidden_dims, self.embed_dim]
        self.encoder = mlp(widths, dropout)
        self.decoder = mlp(widths[::-1], dropout)
        self.quantizer = ResidualQuantizer(n_levels, codebook_size, self.embed_dim, gradient=gradient,
                                           init=init, dead_code_steps=dead_code_steps)

    @property
    def n_levels(self) -> int:
        return self.quantizer.n_levels

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        """x (B, F) -> reconstruction and losses."""
        quantized = self.quantizer(self.encoder(x))
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
            return torch.cat([self.quantizer(self.encoder(chunk)).codes for chunk in x.split(batch_size)])
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
