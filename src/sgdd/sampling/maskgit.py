"""MaskGIT confidence decoding for processes with an absorbing MASK state.

Start from all MASK on the first lengths[i] positions of each row (PAD beyond, never touched). Step k = 1..K
predicts every masked position through process.clean_logits (classifier-free guided), draws a token for
each (greedy argmax, or temperature / top-k / top-p sampling) and commits the most confident ones so that

    m_k(i) = floor(lengths[i] * cos(pi/2 * k / K))

positions stay masked after step k (cosine unmasking schedule; m_K = 0, so nothing is left masked).
sampling.unmask_schedule: linear leaves m_k(i) = floor(lengths[i] (K - k) / K) instead, an equal share per step:
the masked fractions a score-entropy model (log-linear noise) is trained and Euler-decoded at. The
confidence of a prediction is the guided model's probability of the chosen token (float32); for ranking,
annealed Gumbel noise can be added to its log: log p + gumbel_noise * (1 - (k-1)/K) * G, G ~ Gumbel(0, 1)
drawn in float64. MASK is never predicted; PAD and EOS are (the model learns where a sentence ends).
The process is told the fraction of the row's positions (slots + PAD tail) that are masked (the PAD tail counts as
visible), the quantity the masked process conditions on in training.

Row widths (sampling.row_widths, on by default): each row is decoded at its own width, its slots + sampling.pad_tail
(capped at data.max_length), as if it were alone in its batch: the decoder attends to no position beyond it
(Decoder.forward(widths=...)), its mask fraction is over its own positions, and the full passes of key / value
reuse run only the positions inside the widths. Off: every row is L = sgdd.sampling.base.slot_width wide (the
batch's longest slot + the tail), so a short row batched with a long one sees a longer PAD tail than alone.

De-duplication (sampling.dedupe): when several masked positions of a row predict the same token
in one step, only the most confident of them can be committed in that step (PAD exempt); parallel decoding
otherwise writes a content word the model is sure of into several positions at once, before any of them can
see the others. The rest rank below every other masked position, so the schedule's counts still hold.

Position penalty (sampling.position_penalty = lambda >= 0): the ranking score of position l is lowered by
lambda * l, so decoding leans left to right (lambda large: strictly left to right, the schedule's count of
leftmost masked positions per step). The confidence recorded for re-masking is unchanged.

Repetition penalty (sampling.repeat_penalty = lambda >= 0, sampling.repeat_exempt = E): before tokens are
chosen, the logit of every id already visible in the row is lowered by lambda per visible copy, except PAD,
EOS and the E most frequent ids of the training corpus (the sampler's token_counts; function words and
punctuation legitimately recur). A model whose masked positions all see the same z otherwise fills them
with the sentence's most salient word. Without token counts (vocabularies saved before they were recorded)
only PAD / EOS are exempt, with a warning.

Deferred ending (sampling.defer_end): positions predicting PAD or EOS rank below every content prediction, so
they are committed only in steps that have nothing else to commit: the length is settled after the content.

Optional re-masking (sampling.remask = rho > 0): at step k < K, r(i) = min(floor(rho * committed_before(i)),
m_k(i)) of the tokens committed at earlier steps, those with the lowest confidence at their commit time, are
masked again, and r(i) extra new tokens are committed, so the schedule's count m_k(i) still holds and the
final step commits everything.

At most K model calls, all on (B, L) / (N, V) tensors, no loop over the batch. A call takes only the rows in
which the schedule commits something at that step (x2 with guidance): a row of n < K positions commits at
most n times, and a finished row none, so those idle steps cost nothing. Skipping is exact: a step that
commits nothing in a row leaves its state, and so its next prediction, unchanged.
Shortlist (sampling.shortlist = K > 0): each row is scored only against the sampling.shortlist_frequent most
frequent training ids (PAD and EOS first) plus the K ids the model's bag-of-words head ranks highest for the row's
z (shortlist_ids; fixed for the whole decode, shared by a row's guidance passes). The logits at those ids are the
full model's; everything after (penalty, choice, confidence) runs on the shortlisted columns, whose ids are
mapped back before commit. Tokens outside a row's shortlist cannot be written.
Self-conditioned models (model.self_condition): every call also returns the output features at all positions,
kept per row (and per guidance pass) and handed back as the next call's estimate; the first call has none.
An idle row's estimate is not refreshed while it skips, so with self-conditioning skipping is a (small)
approximation: running the row would have updated its estimate, though not its tokens.
Key / value reuse (sampling.kv_refresh = R > 0): steps 1, 1 + R, ... run every position of the active rows and
keep each block's keys and values (per guidance pass); the other steps run only the masked positions and those
whose id changed since their entry was computed, attending to the kept entries of the rest (PAD tail included),
and update the kept entries where they ran (Decoder.forward(kv=KVState)). Approximate: kept entries come from an
earlier state and time input. Measured in bench/RESULTS.md ("Ninth round"). Prefix tokens run in the full passes and are
kept in between. Decoders that cannot (RoPE, self-conditioning, z_positions: Decoder.supports_kv) decode without
reuse, with a warning.
Null-pass reuse (sampling.guidance_refresh = G > 0, with guidance, cfg_scale not 0 or 1): the null
(unconditional) pass of classifier-free guidance runs only at steps 1, 1 + G, ...; there the guidance direction
cond - null is kept for every masked position (NullReuse). The other steps run the conditional pass alone and
add the kept direction: cond_now + (s - 1) * (cond_then - null_then) (at refresh steps exactly null + s * (cond -
null)). Approximate: the kept direction comes from an earlier, more masked state. Keeping the null logits instead
(null_then + s * (cond_now - null_then)) strays further from exact guidance (bench/RESULTS.md "Twelfth round").
A masked position with no kept entry (re-masked by sampling.remask) makes that step run the null pass.
Self-correction (sampling.correct = C > 0, sampling.correct_frac = f): after the last step, C rounds of: one full
(guided) pass over the decoded row at mask fraction 0 scores every decoded token by the model's log-probability
of it there; the ceil(f * n) lowest-scoring of the row's n decoded positions (at least one) are masked and refilled
in one step; each round costs two passes (x2 with guidance). Designed for decoders trained with substitution
noise (diffusion.substitute), taught what a visible token's probability means; measured, it helps a decoder
trained on masked positions only as much: 60-minute fiction models, 1,000 held-out sentences, 16 steps CFG 1.5,
BLEU +0.22 to +0.33 for 1-2 rounds, 27 % slower per round (bench/RESULTS.md "Twenty-third round").
Self-conditioned models decode exactly (a warning). The kept directions are a float32 (masked positions x scored
ids) table: ~40 MB at batch 64 with the fiction shortlist (2,304 ids), up to ~0.3 GB over the full vocabulary.
Row-wise work on the (N, V) logits runs in cache-sized slices of rows (guidance.row_slices): on this CPU a
whole-tensor pass at V = 20k costs 2-3x more, mostly page faults on fresh buffers.
"""

from __future__ import annotations

import logging
import math

import torch

from sgdd.data import frequency_order
from sgdd.models.decoder import KVState
from sgdd.registry import ConfigError
from sgdd.sampling.base import SAMPLERS, Sampler, penalize_repeats, slot_width
from sgdd.sampling.guidance import guidance_passes, guided, row_slices

PAD_ID = 0  # decoder vocabulary contract (sgdd.data.Vocab.PAD); a process may override with .pad_id
EOS_ID = 2  # decoder vocabulary contract (sgdd.data.Vocab.EOS)

log = logging.getLogger("sgdd")


# (n, k, K) -> positions still masked after step k < K of K: n (B,) long, each row's positions to decode -> (B,) long
UNMASK_SCHEDULES = {
    # MaskGIT's: floor(n cos(pi/2 k/K)), few commits first, many last
    "cosine": lambda n, k, K: torch.floor(n.double() * math.cos(math.pi / 2 * k / K)).long(),
    # floor(n (K - k) / K) (integer arithmetic: exact): the same share every step, the masked fractions a
    # score-entropy model sees under log-linear noise (1 - e^-sigma(t) = (1 - eps) t) on Euler's uniform time grid
    "linear": lambda n, k, K: torch.div(n * (K - k), K, rounding_mode="floor"),
}


def masked_count(n: torch.Tensor, k: int, K: int, schedule: str = "cosine") -> torch.Tensor:
    """Positions still masked after step k of K under UNMASK_SCHEDULES[schedule] (cosine: floor(n * cos(pi/2 *
    k/K)); linear: floor(n * (K - k) / K)).

    n (B,) long -> (B,) long; m_0 = n, m_K = 0, non-increasing in k, and m_1 <= n - 1 for n >= 1.
    """
    if k >= K:
        return torch.zeros_like(n)
    return UNMASK_SCHEDULES[schedule](n, k, K)


def ranks_in_rows(score: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank of every entry within its row: score (B, L) -> (B, L) long, 0 = best (largest if descending)."""
    B, L = score.shape
    order = score.argsort(dim=1, descending=descending, stable=True)  # (B, L)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(L, device=score.device).expand(B, L))
    return ranks


def duplicate_predictions(
    pred: torch.Tensor, mask: torch.Tensor, score: torch.Tensor, exempt: int
) -> torch.Tensor:
    """(B, L) bool: masked positions whose predicted id is also predicted at a better-scoring masked position of
    the same row (ties: the earlier position wins). Predictions of `exempt` (PAD) are never duplicates.
    pred (B, L) long, mask (B, L) bool, score (B, L) float; O(B L^2), small for sentence lengths."""
    L = pred.shape[1]
    both = mask[:, :, None] & mask[:, None, :]
    same = (pred[:, :, None] == pred[:, None, :]) & both  # (B, L, L): j predicts i's token
    idx = torch.arange(L, device=pred.device)
    a, b = score[:, :, None], score[:, None, :]
    better = (b > a) | ((b == a) & (idx[None, None, :] < idx[None, :, None]))  # (B, L, L): j beats i
    return (same & better).any(dim=-1) & mask & (pred != exempt)


def shortlist_ids(
    bow_logits: torch.Tensor, token_counts, frequent: int, per_row: int, always: tuple[int, ...], mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared (F,), own (B, K)) decoder ids for shortlist decoding: the `frequent` most frequent ids by
    token_counts (the ids in `always` first; without counts only those), and each row's `per_row` ids with the
    highest bag-of-words logits (B, V) among the rest. MASK is in neither; no id appears twice in a row."""
    B, V = bow_logits.shape
    if token_counts is not None and frequent > 0:
        if len(token_counts) != V:
            raise ValueError(f"token_counts has {len(token_counts)} entries, the model predicts {V} ids")
        shared = frequency_order(token_counts, first=always, exclude=(mask_id,))[: max(frequent, len(always))]
    else:
        shared = torch.tensor(list(always), dtype=torch.long)
    shared = shared.to(bow_logits.device)
    rank = bow_logits.float().clone()
    rank[:, shared] = -math.inf
    rank[:, mask_id] = -math.inf
    K = min(per_row, V - shared.numel() - 1)
    return shared, rank.topk(K, dim=1).indices


def filter_logits(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Restrict each row's support to its top-k tokens and then to the smallest prefix of mass >= top_p.

    logits (N, V) float32 -> (values (N, C), ids (N, C) | None): the candidate logits (C <= V, sorted descending
    when a filter is active, dropped entries at -inf) and their vocabulary ids (None when no filter applies:
    the values are then the logits themselves, ids = column index).
    """
    V = logits.shape[-1]
    if top_k > 0 and top_k < V:
        values, ids = logits.topk(top_k, dim=-1)  # sorted descending
    elif top_p < 1.0:
        values, ids = logits.sort(dim=-1, descending=True)
    else:
        return logits, None
    if top_p < 1.0:
        probs = values.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (N, C) mass of the strictly better tokens
        values = values.masked_fill(mass_before >= top_p, float("-inf"))  # the best token always stays
    return values, ids


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (n,), ids (n,)) of each row's maximum, x (n, C); = x.max(dim=-1) up to ties.

    Two levels: vectorised block maxima over about sqrt(C) blocks, then an index search inside the winning
    block only. On CPU torch's index-tracking max over a 20k-wide row is ~4x slower than amax.
    """
    n, C = x.shape
    S = math.isqrt(C)
    if C < 1024:
        return x.max(dim=-1)
    G = C // S
    C0 = G * S  # x[:, C0:] is a short tail handled on its own
    blocks = x[:, :C0].view(n, G, S)
    best_block_val, best_block = blocks.amax(dim=-1).max(dim=-1)  # (n,), (n,)
    inner = blocks.gather(1, best_block[:, None, None].expand(n, 1, S)).squeeze(1)  # (n, S)
    values, pos = inner.max(dim=-1)
    ids = best_block * S + pos
    if C0 < C:
        tail_val, tail_pos = x[:, C0:].max(dim=-1)
        later = tail_val > values  # ties keep the earlier index
        values = torch.where(later, tail_val, values)
        ids = torch.where(later, tail_pos + C0, ids)
    return values, ids


def sample_categorical(
    logits: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from softmax(logits): logits (n, C) float32 -> (ids (n,) long, log-probability (n,)).

    Two-level inverse CDF: pick a block of about sqrt(C) entries by its mass, then an entry inside it; each
    level draws its own uniform in float64 and searches a float64 cumulative sum. Exact, and far cheaper on
    CPU than torch.multinomial or a full-length cumsum at C = 20k. Entries at -inf are never drawn.
    """
    n, C = logits.shape
    S = math.isqrt(C - 1) + 1  # block size, ceil(sqrt(C))
    G = -(-C // S)  # number of blocks
    top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    w = torch.zeros(n, G * S, dtype=torch.float32, device=logits.device)  # zero-padded weights exp(l - max)
    torch.sub(logits, top, out=w[:, :C])
    w[:, :C].exp_()
    blocks = w.view(n, G, S)
    cdf = blocks.sum(dim=-1).cumsum(dim=-1, dtype=torch.float64)  # (n, G)
    total = cdf[:, -1:]  # (n, 1)
    # (1 - U) * total lies in (0, total]: the first index whose cdf reaches it has positive weight
    u = (1.0 - torch.rand(n, 1, dtype=torch.float64, device=logits.device, generator=generator)) * total
    b = torch.searchsorted(cdf, u).clamp_(max=G - 1)  # (n, 1) block
    inner = blocks.gather(1, b[:, :, None].expand(n, 1, S)).squeeze(1)  # (n, S)
    icdf = inner.cumsum(dim=-1, dtype=torch.float64)  # (n, S)
    u2 = (1.0 - torch.rand(n, 1, dtype=torch.float64, device=logits.device, generator=generator)) * icdf[
        :, -1:
    ]
    j = torch.searchsorted(icdf, u2).clamp_(max=S - 1)  # (n, 1) entry in the block
    ids = (b * S + j).squeeze(1)
    logp = (logits.gather(1, ids[:, None]) - top).squeeze(1) - total.squeeze(1).log().float()
    return ids, logp


def _choose_slice(
    logits: torch.Tensor,
    greedy: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """choose_tokens on one slice of rows; logits (n, V) float32 with forbidden ids already at -inf."""
    if greedy:
        probs = logits.softmax(dim=-1)  # (n, V) fused max / exp-sum / divide
        conf, ids = row_max(probs)
        return ids, conf.log()
    if temperature == 1.0 and top_k <= 0 and top_p >= 1.0:  # the model's own distribution
        return sample_categorical(logits, generator)
    scaled = logits / temperature if temperature != 1.0 else logits
    values, cand_ids = filter_logits(scaled, top_k, top_p)
    pick, _ = sample_categorical(values, generator)  # (n,)
    ids = pick if cand_ids is None else cand_ids.gather(1, pick[:, None]).squeeze(1)
    return ids, logits.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def choose_tokens(
    logits: torch.Tensor,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    forbid: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (ids (N,) long, log-confidence (N,) float32).

    logits (N, V), any float dtype; computed in float32 slice by slice (cache-sized, see row_slices).
    `forbid` is a token id never chosen (MASK). The confidence is the probability of the chosen token under
    softmax(logits) at temperature 1 (the model's own belief), whatever temperature / filters it was drawn with.
    """
    N, V = logits.shape
    ids = torch.empty(N, dtype=torch.long, device=logits.device)
    logconf = torch.empty(N, dtype=torch.float32, device=logits.device)
    for rows in row_slices(N, V, logits.device):
        part = logits[rows].float()  # a view when already float32: the forbid fill then writes through
        if forbid is not None:
            part[:, forbid] = float("-inf")
        ids[rows], logconf[rows] = _choose_slice(part, greedy, temperature, top_k, top_p, generator)
    return ids, logconf


def reuses_null_pass(s, cfg_scale: float, self_condition: bool = False) -> bool:
    """Whether MaskGIT decoding with sampling settings `s` (SamplingConfig) at `cfg_scale` runs the null pass
    only every s.guidance_refresh steps (NullReuse): guidance on (two passes) and a decoder without
    self-conditioning (which runs the null pass at every step). The sampler and bench/quality.py's row ask this."""
    return s.guidance_refresh > 0 and guidance_passes(cfg_scale) == 2 and not self_condition


def reuses_kv(s, model) -> bool:
    """Whether decoding with sampling settings `s` reuses keys / values (KVReuse): s.kv_refresh > 0 and a decoder
    that can (Decoder.supports_kv); a decoder that cannot decodes without reuse, with a warning. The MaskGIT and
    SEDD samplers ask this."""
    if s.kv_refresh <= 0:
        return False
    if not getattr(model, "supports_kv", False):
        log.warning("sampling.kv_refresh: this decoder (RoPE, self-conditioning or z_positions) cannot reuse keys / "
                    "values; decoding without reuse. Set sampling.kv_refresh: 0 to silence this.")
        return False
    return True


class KVReuse:
    """Per-decode state of sampling.kv_refresh: each block's (keys, values) for all passes x B rows, and the id
    each position had when its entry was computed (-1: never)."""

    def __init__(self, refresh: int, B: int, L: int, passes: int, device: torch.device | str):
        self.refresh, self.B, self.passes = refresh, B, passes
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.ids = torch.full((B, L), -1, dtype=torch.long, device=device)

    def logits(self, k: int, rows, x_in: torch.Tensor, run: torch.Tensor, call) -> torch.Tensor:
        """One model call at step k for the active `rows` (x_in = x[rows]): a full pass at steps 1, 1 + refresh,
        ..., else only the positions of `run` (b, L) bool (those the call scores: MaskGIT's masked ones) and
        those whose id changed since their entry was computed; updates the cache and ids. `call(state)` makes
        the model call with kv=state (a KVState) and returns its output, which this returns."""
        b, L = x_in.shape
        B, passes = self.B, self.passes
        full_rows = torch.arange(B, device=x_in.device)[rows]  # (b,) the rows' indices among B
        pass_rows = torch.cat([full_rows + p * B for p in range(passes)])  # (passes * b,)
        stale = (x_in != self.ids[rows]) | run  # (b, L)
        if self.cache is None or (k - 1) % self.refresh == 0 or bool(stale.all()):
            state = KVState()
        else:
            count = stale.sum(dim=1)  # (b,)
            r = int(count.max())
            order = torch.sort((~stale).to(torch.int8), dim=1, stable=True).indices[:, :r]  # stale positions first
            fill = torch.arange(r, device=x_in.device)[None, :] < count[:, None]
            # (b, r): each row's stale positions, then padding the decoder skips (packed: it runs M = count.sum());
            # the decoder updates the entries in place: the cache itself when every row runs, else the rows' copy
            every = isinstance(rows, slice)
            cache = self.cache if every else [(kc[pass_rows], vc[pass_rows]) for kc, vc in self.cache]
            state = KVState(cache, order, fill, writable=True)
        logits = call(state)
        if self.cache is None:
            self.cache = [(kc.new_zeros((passes * B,) + kc.shape[1:]), vc.new_zeros((passes * B,) + vc.shape[1:]))
                          for kc, vc in state.cache]
        for (kc, vc), (kn, vn) in zip(self.cache, state.cache, strict=True):
            if kn is not kc:
                kc[pass_rows] = kn
                vc[pass_rows] = vn
        self.ids[rows] = x_in
        return logits


class NullReuse:
    """Per-decode state of sampling.guidance_refresh: the guidance direction (conditional - null logits) of every
    position that was masked when the null pass last ran (`store` (M, C) float32, row `index[b, l]` for position
    (b, l); -1 = none kept)."""

    def __init__(self, refresh: int, scale: float, B: int, L: int, device: torch.device | str):
        self.refresh, self.scale = refresh, float(scale)
        self.index = torch.full((B, L), -1, dtype=torch.long, device=device)
        self.store: torch.Tensor | None = None
        self.null_passes = 0  # steps that ran the null pass (tests, benchmarks)

    def guide(self, k: int, cond: torch.Tensor, null_fn, x: torch.Tensor, mask: torch.Tensor, mask_id: int,
              forbid: int | None) -> torch.Tensor:
        """Guided logits (N, C) from the conditional ones `cond` (N, C) at the positions of `mask` (B, L) (the
        active rows' masked positions, row-major): cond + (s - 1) * (cond_then - null_then). `null_fn()` runs the
        null pass on the same positions; it is called at refresh steps (where this is exact guidance, then = now)
        and whenever a position has no kept entry. `forbid`: a column both passes set to -inf (MASK); it stays
        -inf (its direction is kept as 0: -inf - -inf is undefined)."""
        at = self.index[mask]  # (N,) kept rows, -1 = none
        if (k - 1) % self.refresh == 0 or self.store is None or bool((at < 0).any()):
            delta = cond - null_fn().float()  # (N, C)
            if forbid is not None:
                delta[:, forbid] = 0.0
            idle = (x == mask_id) & ~mask  # masked positions of rows that did not run: keep their entries
            kept = self.index[idle]
            keep = delta[:0] if self.store is None else self.store[kept.clamp(min=0)]
            self.store = torch.cat([keep, delta])
            self.index.fill_(-1)
            self.index[idle] = torch.where(kept >= 0, torch.arange(kept.numel(), device=kept.device), -1)
            self.index[mask] = keep.shape[0] + torch.arange(delta.shape[0], device=delta.device)
            self.null_passes += 1
        else:
            delta = self.store[at]
        for rows in row_slices(cond.shape[0], max(1, cond.shape[-1]), cond.device):
            cond[rows].add_(delta[rows], alpha=self.scale - 1.0)
        if forbid is not None:
            cond[:, forbid] = -math.inf
        return cond


@SAMPLERS.register("maskgit")
class MaskGITSampler(Sampler):
    """Confidence-based parallel decoding (MaskGIT), cosine schedule by default; see the module docstring."""

    def __init__(self, cfg, token_counts=None):
        super().__init__(cfg, token_counts)
        s = cfg.sampling
        if s.steps < 1:
            raise ConfigError(f"sampling.steps must be >= 1, got {s.steps}")
        if not s.greedy and s.temperature <= 0:
            raise ConfigError(
                f"sampling.temperature must be > 0 when sampling (greedy: false), got {s.temperature}"
            )
        if s.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {s.top_k}")
        if not 0.0 < s.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {s.top_p}")
        if s.gumbel_noise < 0:
            raise ConfigError(f"sampling.gumbel_noise must be >= 0, got {s.gumbel_noise}")
        if s.position_penalty < 0:
            raise ConfigError(f"sampling.position_penalty must be >= 0, got {s.position_penalty}")
        if not 0.0 <= s.remask < 1.0:
            raise ConfigError(f"sampling.remask must be in [0, 1), got {s.remask}")
        if s.guidance_refresh < 0:
            raise ConfigError(f"sampling.guidance_refresh must be >= 0 (0 = off), got {s.guidance_refresh}")
        if s.unmask_schedule not in UNMASK_SCHEDULES:
            raise ConfigError(f"sampling.unmask_schedule must be one of {sorted(UNMASK_SCHEDULES)}, got "
                              f"{s.unmask_schedule!r}")
        if s.correct < 0 or not 0.0 < s.correct_frac < 1.0:
            raise ConfigError(f"sampling.correct must be >= 0 (0 = off) and sampling.correct_frac in (0, 1), got "
                              f"{s.correct} and {s.correct_frac}")
        # ids (B, L) -> (B, De) re-embedded vectors; set by the caller (sgdd.api) for a decoder trained with
        # corrector rows (diffusion.corrector > 0): each correction round then conditions on z + W e_hyp
        self.hypothesis_fn = None

    @torch.no_grad()
    def sample(self, model, process, z, lengths, cfg_scale, generator=None, callback=None, init=None):
        """z (B, Dz), lengths (B,) long -> ids (B, L) long with L = slot_width(lengths); see Sampler.sample.

        init (B, L) long, optional: start from this partly decoded state instead of all MASK (lengths is then
        ignored): only its MASK positions are decoded, on the same schedule over their count (refinement).
        sampling.correct > 0: that many self-correction rounds follow (see correct)."""
        s = self.cfg.sampling
        if process.mask_id is None:
            raise ConfigError(
                f"the maskgit sampler needs a process with a MASK state; {type(process).__name__} has none"
            )
        widths = None if init is not None else self.row_widths(model, lengths)
        x = self._decode(model, process, z, lengths, cfg_scale, s.steps, generator, callback, init, widths)
        if s.correct > 0:  # the positions this call decoded
            if init is not None:
                decoded = init.to(x.device) == process.mask_id
            else:
                decoded = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
            x = self.correct(model, process, z, x, decoded, cfg_scale, s.correct, s.correct_frac, generator,
                             widths)
        return x

    @torch.no_grad()
    def correct(self, model, process, z, x, decoded, cfg_scale, rounds: int, frac: float, generator=None,
                widths=None):
        """Self-correction: `rounds` times, score every decoded position (decoded (B, L) bool) by log p(x_l | x)
        from one full guided pass over x (no position masked, the model's time input at mask fraction 0), mask
        the ceil(frac * count) lowest-scoring decoded positions of each row (at least one) and refill them in one
        MaskGIT step (repetition penalty, dedupe and shortlist as configured). Returns x (B, L).

        Designed for decoders trained with diffusion.substitute > 0; measured, it helps one trained on masked
        positions only as much (bench/RESULTS.md "Twenty-third round"). With self.hypothesis_fn set and a decoder
        built with a hypothesis input (diffusion.corrector > 0), each round's condition is
        model.hypothesis_latent(z, hypothesis_fn(x)): the row's meaning and its current hypothesis's. widths (B,),
        optional: each row's own width (see row_widths)."""
        mask_id = process.mask_id
        B, L = x.shape
        step_model = guided(model, cfg_scale)
        zero = torch.zeros(B, device=x.device)
        count = decoded.sum(dim=1)  # (B,)
        n_mask = torch.clamp(torch.ceil(frac * count.double()).long(), min=1)
        n_mask = torch.where(count > 0, torch.minimum(n_mask, count), 0)
        use_hyp = self.hypothesis_fn is not None and getattr(model, "hyp_proj", None) is not None
        for _ in range(rounds):
            zr = model.hypothesis_latent(z, self.hypothesis_fn(x).to(z.device)) if use_hyp else z
            extra = {} if widths is None else {"widths": widths}
            logits = process.clean_logits(step_model, x, zero, zr, select=decoded, **extra)  # (N, V), no [MASK]
            own = logits.log_softmax(-1).gather(1, x[decoded][:, None])[:, 0]  # (N,) log p(current token)
            score = torch.full((B, L), math.inf, dtype=torch.float64, device=x.device)
            score = score.masked_scatter(decoded, own.double())
            again = (ranks_in_rows(score, descending=False) < n_mask[:, None]) & decoded
            x = self._decode(model, process, zr, None, cfg_scale, 1, generator, None, x.masked_fill(again, mask_id),
                             widths)
        return x

    def _decode(self, model, process, z, lengths, cfg_scale, K: int, generator, callback, init, widths=None):
        """The MaskGIT loop of `sample` in K steps (no self-correction); widths (B,), optional: each row's own
        width (row_widths), else every row is L wide."""
        s = self.cfg.sampling
        mask_id = process.mask_id
        pad_id = getattr(process, "pad_id", PAD_ID)
        device = z.device
        B = z.shape[0]
        step_model = guided(model, cfg_scale)
        if init is not None:
            if init.dim() != 2 or init.shape[0] != B:
                raise ValueError(f"init must be (B, L) = ({B}, L), got {tuple(init.shape)}")
            x = init.to(device=device, dtype=torch.long).clone()
            L = x.shape[1]
            valid = x == mask_id
        else:
            lengths = lengths.to(device=device, dtype=torch.long)
            if lengths.shape != (B,) or int(lengths.min()) < 1:
                raise ValueError(f"lengths must be (B,) = ({B},) positive integers, got {tuple(lengths.shape)}")
            L = slot_width(lengths, self.cfg)
            valid = torch.arange(L, device=device)[None, :] < lengths[:, None]  # (B, L) positions to decode
            x = torch.full((B, L), pad_id, dtype=torch.long, device=device).masked_fill(valid, mask_id)
        if widths is not None:
            widths = widths.to(device=device, dtype=torch.long)
        commit_conf = torch.full((B, L), math.inf, dtype=torch.float64, device=device)  # log p at commit time
        # self-conditioning: each pass's output features of the last step, (passes, B, L, D), handed back as sc
        self_cond = bool(getattr(model, "self_condition", False))
        passes = getattr(step_model, "passes", 1)
        state: torch.Tensor | None = None
        shared = own = cand = column_of = prepared = None
        if s.shortlist > 0:
            if not hasattr(model, "bow_logits") or getattr(model, "bow_mlp", None) is None:
                raise ConfigError("sampling.shortlist needs a model with a bag-of-words head; set sampling.shortlist: 0")
            if self.token_counts is None and s.shortlist_frequent > 0:
                log.warning("sampling.shortlist: this vocabulary has no training token counts, so the shortlist "
                            "holds only PAD / EOS and the bag-of-words ids")
            shared, own = shortlist_ids(model.bow_logits(z), self.token_counts, s.shortlist_frequent, s.shortlist,
                                        (pad_id, EOS_ID), mask_id)
            # the output table's rows at the shortlist, gathered once for the whole decode
            prepared = model.prepare_shortlist(shared, own) if hasattr(model, "prepare_shortlist") else None
            cand = torch.cat([shared[None, :].expand(B, -1), own], dim=1)  # (B, C) the id of every column
            V = int(model.vocab_size)
            column_of = torch.full((B, V), -1, dtype=torch.long, device=device)
            column_of.scatter_(1, cand, torch.arange(cand.shape[1], device=device).expand(B, -1).contiguous())
        n = valid.sum(dim=1)  # (B,) positions to decode per row
        reuse_kv = reuses_kv(s, model)
        # null-pass reuse: the conditional pass runs alone (one pass) and NullReuse guides it
        reuse_null = reuses_null_pass(s, cfg_scale)
        if reuse_null and self_cond:
            log.warning("sampling.guidance_refresh: a self-conditioned decoder runs the null pass at every step; "
                        "set sampling.guidance_refresh: 0 to silence this.")
            reuse_null = False
        nulls = None
        if reuse_null:
            nulls = NullReuse(s.guidance_refresh, cfg_scale, B, L, device)
            step_model, null_model, passes = guided(model, 1.0), guided(model, 0.0), 1
        kv = KVReuse(s.kv_refresh, B, L, passes, device) if reuse_kv else None

        for k in range(1, K + 1):
            mask = x == mask_id  # (B, L)
            masked_now = mask.sum(dim=1)  # (B,)
            # fraction of the row's positions (L, or its own width) that are masked, as the process measures it
            # in training (the PAD tail counts as visible positions)
            mask_ratio = masked_now.float() / (L if widths is None else widths.float())  # (B,)
            target = masked_count(n, k, K, s.unmask_schedule)  # (B,) masked after this step
            remask_n = torch.zeros_like(n)
            if s.remask > 0 and k < K:
                committed_before = valid & ~mask  # (B, L)
                remask_n = torch.minimum(
                    torch.floor(s.remask * committed_before.sum(dim=1).double()).long(), target
                )
            commit_n = masked_now - target + remask_n  # (B,) <= masked_now since remask_n <= target
            # idle rows (the schedule commits nothing in them this step: short rows at many steps, finished
            # rows) skip the model call; their state, and so their next prediction, is unchanged
            active = commit_n > 0  # (B,)
            if not bool(active.any()):
                if callback is not None:
                    callback(k, x)
                continue
            rows = slice(None) if bool(active.all()) else active.nonzero()[:, 0]  # a slice indexes without copying
            mask = mask & active[:, None]
            x_in, mask_in = x[rows], mask[rows]
            extra = {} if widths is None else {"widths": widths[rows]}
            if cand is not None:
                extra["shortlist"] = (shared, own[rows]) if prepared is None else prepared.rows(rows)
            if self_cond:
                b = x_in.shape[0]
                sc_in = None if state is None else state[:, rows].reshape(passes * b, L, -1)
                logits, feats = process.clean_logits(
                    step_model, x_in, mask_ratio[rows], z[rows], select=mask_in, sc=sc_in, return_features=True,
                    **extra,
                )
                if state is None:
                    state = feats.new_zeros((passes, B, L, feats.shape[-1]))
                state[:, rows] = feats.view(passes, b, L, -1)
            elif kv is not None:
                def call(state, x_in=x_in, ratio=mask_ratio[rows], z_in=z[rows], mask_in=mask_in, extra=extra):
                    return process.clean_logits(step_model, x_in, ratio, z_in, select=mask_in, kv=state, **extra)

                logits = kv.logits(k, rows, x_in, mask_in, call)
            else:
                logits = process.clean_logits(  # (N, V), N = mask.sum() (active rows only); (N, C) shortlisted
                    step_model, x_in, mask_ratio[rows], z[rows], select=mask_in, **extra
                )
            if nulls is not None:
                def null_fn(x_in=x_in, mask_in=mask_in, ratio=mask_ratio[rows], z_in=z[rows], extra=extra):
                    return process.clean_logits(null_model, x_in, ratio, z_in, select=mask_in, **extra)

                logits = nulls.guide(k, logits.float(), null_fn, x, mask, mask_id,
                                     forbid=mask_id if cand is None else None)
            if s.repeat_penalty > 0:
                exempt = self.exempt(V if cand is not None else logits.shape[-1], pad_id, x.device)
                logits = penalize_repeats(logits, x_in, mask_in, exempt, s.repeat_penalty, mask_id,
                                          None if cand is None else column_of[rows])
            ids, logconf = choose_tokens(  # (N,), (N,)
                logits, s.greedy, s.temperature, s.top_k, s.top_p, generator,
                forbid=mask_id if cand is None else None,  # a shortlist never holds MASK
            )
            if cand is not None:  # columns -> vocabulary ids
                ids = cand[rows][mask_in.nonzero()[:, 0], ids]

            # scatter the N predictions back onto the (B, L) grid (row-major order = the select order)
            pred = x.masked_scatter(mask, ids)  # (B, L)
            conf = torch.full((B, L), -math.inf, dtype=torch.float64, device=device)
            conf = conf.masked_scatter(mask, logconf.double().clamp(min=-1e4))  # finite at masked positions
            score = conf
            if s.gumbel_noise > 0:
                u = torch.rand(B, L, dtype=torch.float64, device=device, generator=generator)
                gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float64).tiny)))
                score = conf + (s.gumbel_noise * (1.0 - (k - 1) / K)) * gumbel.masked_fill(~mask, 0.0)

            if s.position_penalty > 0:  # visible positions stay at -inf
                pos = torch.arange(L, device=device, dtype=torch.float64)
                score = score - s.position_penalty * pos[None, :]

            if s.dedupe:  # duplicates rank below every other masked position (still above visible ones)
                score = torch.where(duplicate_predictions(pred, mask, score, pad_id), score - 1e6, score)
            if s.defer_end:  # the sentence's end is decided after its content
                score = torch.where(mask & ((pred == pad_id) | (pred == EOS_ID)), score - 1e7, score)

            commit = ranks_in_rows(score, descending=True) < commit_n[:, None]  # only masked rows rank high
            commit &= mask
            x = torch.where(commit, pred, x)
            commit_conf = torch.where(commit, conf, commit_conf)

            if s.remask > 0 and k < K:
                key = torch.where(committed_before, commit_conf, math.inf)  # earlier commits only
                again = (ranks_in_rows(key, descending=False) < remask_n[:, None]) & committed_before
                x = x.masked_fill(again, mask_id)
                commit_conf = commit_conf.masked_fill(again, math.inf)

            if callback is not None:
                callback(k, x)
        return x
