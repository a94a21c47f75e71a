"""The variational information bottleneck between the frozen encoder's vector e and the decoder's latent z.

    e (B, De) -> LayerNorm -> MLP -> mu, logvar (B, Dz)
    training: z = mu + exp(logvar / 2) * eps, eps ~ N(0, I);  eval: z = mu
    kl (B,) = KL(N(mu, diag exp(logvar)) || N(0, I))

Every path from e to the decoder goes through z: there is no deterministic bypass around the bottleneck.
The input LayerNorm brings unit-normalised encoder vectors (entries ~ 1/sqrt(De)) to unit scale; the logvar
head starts at a small variance so the decoder sees a usable signal from the first step (the KL term then
decides how much noise to keep).
"""

from __future__ import annotations

import torch
from torch import nn

INIT_LOGVAR = -4.0  # posterior std exp(-2) ~ 0.14 at init


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dim, float32: (B, Dz) -> (B,)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class VIB(nn.Module):
    def __init__(self, in_dim: int, latent_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(in_dim, latent_dim)
        self.in_dim, self.latent_dim = in_dim, latent_dim
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.SiLU())
        self.mu = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in (self.net[1], self.mu):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.logvar.weight, std=1e-3)
        nn.init.constant_(self.logvar.bias, INIT_LOGVAR)

    def posterior(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e (B, De) -> mu, logvar (B, Dz), float32."""
        h = self.net(e.float())
        return self.mu(h).float(), self.logvar(h).float()

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e (B, De) -> z (B, Dz) (a sample in training, mu in eval), kl (B,)."""
        mu, logvar = self.posterior(e)
        z = reparameterize(mu, logvar) if self.training else mu
        return z, gaussian_kl(mu, logvar)
