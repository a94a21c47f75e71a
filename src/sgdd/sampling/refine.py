"""Encoder-guided refinement: a hill climb on the re-embedding cosine (`sampling.refine` rounds).

Reranking (best-of-K) can only choose among whole decodes. Refinement edits the chosen one: each round makes
C variants of every input's current hypothesis by re-masking a random fraction of its positions (its tokens, its
end token and a few spare positions after it, so the length can move), lets the sampler fill them again with
annealed Gumbel noise on its confidences (so the C variants differ), re-encodes all B*C variants with the frozen
encoder in one call and keeps, per input, the variant closest to the input's vector if it is closer than the
current hypothesis. The cosine of the kept hypothesis never decreases from round to round.

`refine` is pure apart from the two callables it is given, so it is testable with fakes:

    fill_fn(x (N, L) long with MASK at the positions to decode) -> (N, L) long without MASK
    score_fn(ids (N, L) long, rows (N,) long = which input each row belongs to) -> cosine (N,) float

Cost per round: one sampler run on B*C rows (sampling.refine_steps model calls) and B*C encoder passes.
"""

from __future__ import annotations

import torch


def refine_region(x: torch.Tensor, pad_id: int, spare: int) -> torch.Tensor:
    """(N, L) bool: the positions a variant may re-mask: every non-PAD position (tokens and the end token) and
    the `spare` positions after the last of them."""
    N, L = x.shape
    filled = x != pad_id
    pos = torch.arange(L, device=x.device)
    last = torch.where(filled, pos, -1).amax(dim=1)  # (N,) index of the last non-PAD position, -1 if none
    return filled | ((pos[None, :] > last[:, None]) & (pos[None, :] <= last[:, None] + spare))


def make_variants(
    x: torch.Tensor,
    candidates: int,
    mask_frac: float,
    mask_id: int,
    pad_id: int,
    spare: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x (B, L) -> (B * candidates, L): each row repeated `candidates` times (input-major), each copy with every
    region position masked independently with probability mask_frac and at least one position masked."""
    rows = x.repeat_interleave(candidates, dim=0)  # (N, L)
    region = refine_region(rows, pad_id, spare)
    u = torch.rand(rows.shape, generator=generator, device=x.device)
    u = torch.where(region, u, 2.0)  # outside the region: never masked
    chosen = u < mask_frac
    # at least one masked position per row: the region position with the smallest draw
    first = u.argmin(dim=1)
    chosen[torch.arange(rows.shape[0], device=x.device), first] |= region.any(dim=1)
    return rows.masked_fill(chosen, mask_id)


@torch.no_grad()
def refine(
    x: torch.Tensor,
    fill_fn,
    score_fn,
    rounds: int,
    candidates: int,
    mask_frac: float,
    mask_id: int,
    pad_id: int,
    spare: int = 2,
    generator: torch.Generator | None = None,
    score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Hill climb from hypotheses x (B, L). Returns (ids (B, L), their cosines (B,), the mean cosine after each
    round incl. the start). `score` = the start's cosines if already known (else one score_fn call)."""
    B, _ = x.shape
    rows_of = torch.arange(B, device=x.device)
    best = x.clone()
    best_score = score_fn(best, rows_of).float() if score is None else score.float().clone()
    history = [float(best_score.mean())]
    for _ in range(rounds):
        variants = fill_fn(make_variants(best, candidates, mask_frac, mask_id, pad_id, spare, generator))
        if (variants == mask_id).any():
            raise RuntimeError("fill_fn left [MASK] positions in the variants")
        owner = rows_of.repeat_interleave(candidates)
        cos = score_fn(variants, owner).float().view(B, candidates)
        top, arg = cos.max(dim=1)  # (B,)
        better = top > best_score
        pick = variants.view(B, candidates, -1)[rows_of, arg]  # (B, L)
        best = torch.where(better[:, None], pick, best)
        best_score = torch.where(better, top, best_score)
        history.append(float(best_score.mean()))
    return best, best_score, history
