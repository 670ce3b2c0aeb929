"""Residual vector quantizer for the RQ-VAE (TIGER, Rajput et al. 2023, section 3.1).

Level l quantizes the residual r_l = x - sum_{j<l} e_j to its nearest codeword e_l of codebook l; the
quantized vector is sum_l e_l and the semantic ID is the tuple of the L codeword indices.

Training pieces:
- k-means initialisation of every level on a sample of encoder outputs (TIGER section 3.1 uses
  k-means on the first batch to avoid codebook collapse);
- gradients through the non-differentiable lookup by straight-through (VQ-VAE) or the rotation trick
  (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick"), applied once from
  the encoder output x to the total quantized vector;
- codebook loss ||sg(r_l) - e_l||^2 and commitment loss ||r_l - sg(e_l)||^2 summed over levels;
- dead-code reset: a code unused for `dead_code_steps` training steps is re-seeded with the residual of
  a poorly quantized item of the current batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from modules.kmeans import kmeans, squared_distances

GRADIENTS = ("straight_through", "rotation")


class QuantizerOutput(NamedTuple):
    """Result of `ResidualQuantizer.forward` for a batch of B vectors of width D over L levels.

    quantized:       (B, D) sum of the chosen codewords, carrying the chosen gradient estimator.
    codes:           (B, L) int64 codeword index per level.
    level_quantized: (B, L, D) chosen codeword per level (no gradient); sums to `quantized` over L.
    level_residuals: (B, L, D) input of each level (no gradient), used for dead-code reset.
    codebook_loss:   scalar, mean over levels of ||sg(r_l) - e_l||^2 (moves codewords).
    commitment_loss: scalar, mean over levels of ||r_l - sg(e_l)||^2 (moves the encoder), unweighted.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    level_quantized: torch.Tensor
    level_residuals: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


def rotation_trick(x: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Return a tensor equal to q (B, D) whose gradient reaches x (B, D) through the rotation-and-scale
    map that takes x onto q (Fifty et al. 2024, eq. 4), treated as a constant.

    R = I - 2 r r^T + 2 q^ x^^T with r = (x^ + q^)/||x^ + q^||, scale ||q|| / ||x||.
    """
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    x_hat = (x / x_norm).detach()
    q_hat = (q / q_norm).detach()
    r = x_hat + q_hat
    r = (r / r.norm(dim=-1, keepdim=True).clamp_min(eps)).detach()
    rotated = x - 2 * r * (r * x).sum(-1, keepdim=True) + 2 * q_hat * (x_hat * x).sum(-1, keepdim=True)
    rotated = rotated * (q_norm / x_norm).detach()
    # Forward value exactly q; backward through the (constant) rotation applied to x.
    return rotated + (q - rotated).detach()


class ResidualQuantizer(nn.Module):
    """L codebooks of K codewords of width D.

    Args:
        n_levels: L, number of codebooks (semantic-ID length before the collision column).
        codebook_size: K codewords per level.
        dim: D, width of the encoder output.
        gradient: "rotation" or "straight_through".
        init: "kmeans" (call `initialise` with data before use) or "random" (unit Gaussian codewords).
        dead_code_steps: a code unused in this many consecutive training batches is reset; 0 disables.
        kmeans_iterations: Lloyd iterations per level in `initialise`.
    """

    def __init__(self, n_levels: int = 3, codebook_size: int = 256, dim: int = 32,
                 gradient: str = "rotation", init: str = "kmeans", dead_code_steps: int = 100,
                 kmeans_iterations: int = 20):
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}.")
        if init not in ("kmeans", "random"):
            raise ValueError(f"init must be 'kmeans' or 'random', got {init!r}.")
        self.n_levels, self.codebook_size, self.dim = n_levels, codebook_size, dim
        self.gradient, self.init, self.dead_code_steps = gradient, init, dead_code_steps
        self.kmeans_iterations = kmeans_iterations
        self.codebooks = nn.Parameter(torch.randn(n_levels, codebook_size, dim))
        # Saved in the checkpoint, so a reloaded model knows it was initialised.
        self.register_buffer("initialised", torch.tensor(init == "random"))
        self.register_buffer("steps_since_used", torch.zeros(n_levels, codebook_size, dtype=torch.long))

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means initialise level by level on x (N, D): level l clusters the residuals left by levels < l."""
        residual = x.detach().float()
        for level in range(self.n_levels):
            centroids = kmeans(residual, self.codebook_size, self.kmeans_iterations, generator)
            self.codebooks.data[level] = centroids.to(self.codebooks.dtype)
            residual = residual - centroids[squared_distances(residual, centroids).argmin(1)]
        self.initialised.fill_(True)
        self.steps_since_used.zero_()

    def _lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy residual lookup of x (B, D): (codes (B, L), level_quantized (B, L, D), level_residuals (B, L, D))."""
        residual = x.detach()
        codes, chosen, residuals = [], [], []
        for level in range(self.n_levels):
            codebook = self.codebooks[level].detach()
            index = squared_distances(residual, codebook).argmin(1)
            codeword = codebook[index]
            codes.append(index)
            chosen.append(codeword)
            residuals.append(residual)
            residual = residual - codeword
        return torch.stack(codes, 1), torch.stack(chosen, 1), torch.stack(residuals, 1)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """Quantize x (B, D); in training mode also update the per-code usage counters."""
        if not bool(self.initialised):
            raise RuntimeError("ResidualQuantizer uses k-means initialisation: call initialise(encoder outputs) "
                               "before the first forward pass (train_rqvae.py does this on a sample of items).")
        codes, level_quantized, level_residuals = self._lookup(x)
        # Residual inputs with gradient to the encoder (earlier codewords are constants here).
        offsets = torch.cumsum(level_quantized, dim=1) - level_quantized  # sum_{j<l} e_j
        residuals_with_grad = x.unsqueeze(1) - offsets
        selected = self.codebooks.gather(1, codes.T.unsqueeze(-1).expand(-1, -1, self.dim)).transpose(0, 1)
        codebook_loss = (residuals_with_grad.detach() - selected).pow(2).mean(dim=(0, 2)).sum() / self.n_levels
        commitment_loss = (residuals_with_grad - selected.detach()).pow(2).mean(dim=(0, 2)).sum() / self.n_levels
        total = level_quantized.sum(1)
        if self.gradient == "rotation":
            quantized = rotation_trick(x, total)
        else:
            quantized = x + (total - x).detach()
        if self.training:
            self._count_usage(codes)
        return QuantizerOutput(quantized, codes, level_quantized, level_residuals, codebook_loss, commitment_loss)

    @torch.no_grad()
    def _count_usage(self, codes: torch.Tensor) -> None:
        """Advance every code's idle counter by one batch and zero it for the codes used in `codes` (B, L)."""
        self.steps_since_used += 1
        for level in range(self.n_levels):
            self.steps_since_used[level, codes[:, level]] = 0

    @torch.no_grad()
    def reset_dead_codes(self, level_residuals: torch.Tensor,
                         generator: torch.Generator | None = None) -> list[int]:
        """Re-seed codes idle for >= dead_code_steps batches from the worst-quantized rows of a batch.

        level_residuals: (B, L, D) from `forward`. At level l, rows are ranked by their distance to
        their nearest codeword; dead codes take the residuals of the worst rows (with a little noise so
        that two codes seeded from one row separate). Returns the number of codes reset per level.
        """
        if self.dead_code_steps <= 0:
            return [0] * self.n_levels
        reset_counts = []
        for level in range(self.n_levels):
            dead = torch.nonzero(self.steps_since_used[level] >= self.dead_code_steps).squeeze(1)
            reset_counts.append(len(dead))
            if len(dead) == 0:
                continue
            residual = level_residuals[:, level]
            error = squared_distances(residual, self.codebooks[level]).min(1).values
            worst = error.argsort(descending=True)[:max(len(dead), 1)]
            pick = worst[torch.randint(len(worst), (len(dead),), generator=generator, device="cpu").to(worst.device)]
            pick[:min(len(dead), len(worst))] = worst[:min(len(dead), len(worst))]
            noise = torch.randn(len(dead), self.dim, generator=generator, device="cpu").to(residual)
            scale = residual.std().clamp_min(1e-6) * 0.01
            self.codebooks.data[level, dead] = residual[pick] + noise * scale
            self.steps_since_used[level, dead] = 0
        return reset_counts
