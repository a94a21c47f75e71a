"""From latents to text: length choice, sampler call under autocast, detokenisation.

Shared by the training loop's validation reconstructions, the Python API, generate.py and evaluate.py, so
every path decodes the same way (lengths = a quantile of the length head's distribution + spare positions,
which the model fills with PAD after the end token, as it learned from the randomly padded training batches).
"""

from __future__ import annotations

import torch

from sgdd.config import Config
from sgdd.precision import autocast


def length_quantile(logits: torch.Tensor, q: float) -> torch.Tensor:
    """logits (B, C) over lengths 0..C-1 -> (B,) the smallest length whose cumulative probability reaches q."""
    cdf = logits.float().softmax(dim=-1).cumsum(dim=-1)  # (B, C)
    return (cdf < q).sum(dim=-1).clamp(max=logits.shape[-1] - 1)


def choose_lengths(net, z: torch.Tensor, cfg: Config, quantile: float | None = None) -> torch.Tensor:
    """(B,) number of positions to decode: the length head's `quantile` (tokens + EOS) + sampling.length_slack,
    capped at max_length; always max_length when sampling.length == max or the model has no length head."""
    B = z.shape[0]
    L = cfg.data.max_length
    head = getattr(net, "length_head", None)
    if cfg.sampling.length == "max" or head is None:
        return torch.full((B,), L, dtype=torch.long, device=z.device)
    q = cfg.sampling.length_quantile if quantile is None else quantile
    with torch.no_grad():
        n = length_quantile(head(z.float()), q)  # (B,) tokens incl. EOS
    return (n + cfg.sampling.length_slack).clamp(min=2, max=L)


@torch.no_grad()
def decode_latents(
    net,
    process,
    sampler,
    vocab,
    z: torch.Tensor,
    cfg: Config,
    cfg_scale: float | None = None,
    generator: torch.Generator | None = None,
    callback=None,
    lengths: torch.Tensor | None = None,
) -> list[str]:
    """z (B, Dz) -> B strings. The decoder runs under the training precision's autocast; the sampler keeps
    its probabilities in float32."""
    scale = cfg.sampling.cfg_scale if cfg_scale is None else cfg_scale
    if lengths is None:
        lengths = choose_lengths(net, z, cfg)
    device = z.device
    with autocast(cfg.training.precision, device):
        ids = sampler.sample(net.decoder, process, z, lengths, scale, generator=generator, callback=callback)
    return [vocab.decode(row) for row in ids.tolist()]


@torch.no_grad()
def decode_sorted(
    net,
    process,
    sampler,
    vocab,
    z: torch.Tensor,
    cfg: Config,
    batch_size: int,
    generator: torch.Generator | None = None,
    callback=None,
    lengths: torch.Tensor | None = None,
) -> list[str]:
    """z (N, Dz) -> N strings in input order, decoded in batches of rows with similar slot lengths.

    Rows are sorted by slot length (stable) before batching, so a batch's rows see nearly the same PAD tail
    (sampling.pad_tail after the batch's longest slot) whatever else is decoded with them, and short rows do not
    pay for a long row's positions. callback(step, x (b, L), rows) gets the input indices of x's rows."""
    lengths = choose_lengths(net, z, cfg) if lengths is None else lengths.to(z.device)
    order = torch.argsort(lengths, stable=True)
    out: list[str] = [""] * z.shape[0]
    for i in range(0, z.shape[0], batch_size):
        idx = order[i : i + batch_size]
        rows = idx.tolist()
        cb = None if callback is None else (lambda k, x, r=rows: callback(k, x, r))
        texts = decode_latents(net, process, sampler, vocab, z[idx], cfg, generator=generator, callback=cb,
                               lengths=lengths[idx])
        for j, text in zip(rows, texts, strict=True):
            out[j] = text
    return out
