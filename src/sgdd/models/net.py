"""SGDDNet: the trainable parts in one module (VIB head, decoder, length head), built from the whole Config.

e (B, De) --vib--> z (B, Dz), kl (B,)
(x_t, t, z) --decoder--> logits                 (the callable handed to processes and samplers)
z --length_head--> logits (B, max_length + 1)  over sentence length incl. EOS (None when disabled)
"""

from __future__ import annotations

import torch
from torch import nn

from sgdd.models.decoder import Decoder
from sgdd.models.vib import VIB


class LengthHead(nn.Module):
    """z (B, Dz) -> logits (B, max_length + 1) over the number of tokens including EOS (0..max_length)."""

    def __init__(self, latent_dim: int, max_length: int, hidden: int = 256):
        super().__init__()
        self.max_length = max_length
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, max_length + 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class SGDDNet(nn.Module):
    def __init__(
        self,
        cfg,
        vocab_size: int,
        encoder_dim: int,
        pretrained=None,
        encoder_ids: list[int] | None = None,
    ):
        """cfg: the whole sgdd.config.Config. pretrained: the encoder's transformers model (weights copied into
        the decoder when cfg.model.init_from == "encoder"), its config, or None (sizes from cfg.model)."""
        super().__init__()
        m = cfg.model
        self.vib = VIB(encoder_dim, m.latent_dim)
        self.decoder = Decoder(
            m, vocab_size, cfg.data.max_length, pretrained=pretrained, encoder_ids=encoder_ids,
            hypothesis_dim=encoder_dim if getattr(cfg.diffusion, "corrector", 0.0) > 0 else 0,
        )
        self.length_head = LengthHead(m.latent_dim, cfg.data.max_length) if m.length_head else None

    def forward(self, x_t, t, z, uncond=None, select=None, columns=None, target=None) -> torch.Tensor:
        """Same as self.decoder(...)."""
        return self.decoder(x_t, t, z, uncond, select, columns, target)
