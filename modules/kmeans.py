"""Plain Lloyd's k-means in torch, with k-means++ seeding (used to initialise RQ-VAE codebooks)."""
from __future__ import annotations

import torch


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, D) x (K, D) -> (B, K) squared Euclidean distances (clamped at 0 against rounding)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.T + centroids.pow(2).sum(1)).clamp_min(0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick `k` seeds from the rows of x (N, D) with k-means++ (D^2 sampling). Returns (k, D).

    When N < k, or when all remaining mass is zero (duplicate points), seeds repeat rows, and Lloyd's
    iterations leave the duplicates in place; dead-code reset during training re-seeds them.
    """
    n = len(x)
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    seeds = [x[first]]
    closest = squared_distances(x, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            index = torch.randint(n, (1,), generator=generator, device="cpu").item()
        else:
            probs = (closest / total).cpu()
            index = torch.multinomial(probs, 1, generator=generator).item()
        seeds.append(x[index])
        closest = torch.minimum(closest, squared_distances(x, x[index:index + 1]).squeeze(1))
    return torch.stack(seeds)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iterations: int = 20,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Cluster the rows of x (N, D) into k centroids (k, D).

    k-means++ seeding, then `iterations` Lloyd steps; an empty cluster keeps its previous centroid.
    """
    x = x.detach().float()
    centroids = kmeans_plus_plus(x, k, generator)
    for _ in range(iterations):
        assignment = squared_distances(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=k).to(x.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids
