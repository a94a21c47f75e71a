"""The masked (absorbing-state) diffusion process and its loss (MDLM-style), registered as "masked".

Forward corruption: every position of x_0, padding and EOS included (the model must learn where a sentence
ends), is independently replaced by [MASK] with probability 1 - alpha(t), t drawn per sequence.

Loss, with m_i the masked positions of sequence i and L the padded length:

    elbo:    mean_i  weight(t_i) * sum_{l in m_i} CE(logits_il, x0_il) / L      (per-token NLL bound)
    uniform: mean over all masked tokens of CE

t is drawn stratified over the batch (one uniform offset, B evenly spaced strata in [eps, 1]) for a
lower-variance estimate. The model is asked for logits at the masked positions only ((N, V), never
(B, L, V)); cross-entropy runs in float32; the [MASK] class is excluded (x_0 never contains it).

What the model sees as its time input: the time whose keep probability equals the realised fraction of
unmasked positions of x_t, t' = inverse(1 - n_masked / L). Samplers know exactly that fraction and pass it
to `clean_logits`, so training and sampling condition on the same quantity. The ELBO weight uses the drawn t.

Sampled softmax (diffusion.softmax_sample = K > 0, training steps only): the cross-entropy's normaliser over the
whole vocabulary is replaced by an importance-sampled estimate over K + K // 2 columns, the K ids most frequent in
the training corpus (always scored) and K // 2 of the rest drawn uniformly without replacement (their exp
weighted by |rest| / (K // 2)), plus each row's own target scored exactly. At 3 layers the full (D x V) output
product is about a third of a training step's FLOPs; K = 2048 of V = 20k cuts it ~7x. Validation losses (no
grad), `nll` and sampling use the full vocabulary; the training-step metrics (loss, ce, nll: the log of an
estimate, biased low; acc: argmax over the step's columns) are over the sampled columns.

Substitution noise (diffusion.substitute = p > 0, training steps only): after masking, each visible position
holding a token (PAD excluded) is replaced w.p. p by a wrong id, drawn half the time from the corpus's unigram
distribution (function-word errors) and half from the row's bag-of-words head, softmax(bow_logits(z)) (words of
the sentence's topic in the wrong place: the kind of error the decoder itself makes); without a bag-of-words head
all from the unigram. The loss gains diffusion.substitute_weight * the mean cross-entropy of x_0 over the
visible token positions (substituted or not; every substituted one and a random quarter of the others are
scored, those weighted x4: scoring them all cost ~20 % of the training speed), so the model learns
p(x_0 | x_t) where x_t may hold wrong tokens, and its probability of a visible token says whether that token
belongs there: what MaskGIT's self-correction (sampling.correct) scores decoded tokens with. The time input and
the ELBO term (masked positions) are as without substitution; validation losses and `nll` never substitute.

Trained corrector (diffusion.corrector = q > 0, training steps only): a random share q of each batch's rows are
corrector rows instead of ordinary ones. For each, a hypothesis: x_0 masked at a stratified time in [1/2, 1],
the masked positions filled with the model's own argmax (one pass, no gradient, conditional). The frozen encoder
re-embeds the hypothesis's text (set_hypothesis_encoder) and the row's condition becomes z + W e_hyp
(Decoder.hypothesis_latent). The hypothesis is re-masked at a ratio uniform in (0, 1/2] and the model is scored
on x_0 at its masked positions, at every visible position whose hypothesis token is wrong and at a random quarter
of the right ones (weighted x4; positions PAD in both excluded). corrector_weight * that weighted mean
cross-entropy joins the loss. At sampling time MaskGIT's self-correction rounds condition on each round's
re-embedded hypothesis the same way (sgdd.api). Validation losses and `nll` never use corrector rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sgdd.diffusion.base import PROCESSES, ModelFn, Process, SampledSoftmax
from sgdd.diffusion.schedules import build_schedule

PAD_ID = 0  # decoder vocabulary specials (plan.md, sgdd.data.Vocab)
MASK_ID = 1
EOS_ID = 2
CLEAN_SCORED = 0.25  # diffusion.substitute: share of the unsubstituted visible tokens scored (weighted by its inverse)


def stratified_times(
    B: int, eps: float, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) times in [eps, 1]: one uniform offset shared by B evenly spaced strata."""
    u = torch.rand(1, device=device, generator=generator)
    u = (u + torch.arange(B, device=device, dtype=torch.float32) / B) % 1.0
    return eps + (1.0 - eps) * u


def exclude_class(logits: torch.Tensor, index: int) -> torch.Tensor:
    """float32 copy of logits (N, V) with class `index` at -inf."""
    bias = torch.zeros(logits.shape[-1], device=logits.device)
    bias[index] = float("-inf")
    return logits.float() + bias


@PROCESSES.register("masked")
class MaskedProcess(SampledSoftmax, Process):
    def __init__(self, cfg):
        """cfg: the whole sgdd.config.Config (reads cfg.diffusion)."""
        d = cfg.diffusion
        self.schedule = build_schedule(d.schedule)
        self.eps = float(d.eps)
        self.weighting = d.loss_weighting
        if self.weighting not in ("elbo", "uniform"):
            raise ValueError(f"diffusion.loss_weighting must be elbo or uniform, got {self.weighting}")
        self.mask_id = MASK_ID
        self.pad_id = PAD_ID
        self.softmax_sample = int(getattr(d, "softmax_sample", 0))
        self.substitute = float(getattr(d, "substitute", 0.0))
        self.substitute_weight = float(getattr(d, "substitute_weight", 1.0))
        if not 0.0 <= self.substitute < 1.0:
            raise ValueError(f"diffusion.substitute must be in [0, 1), got {self.substitute}")
        self._unigram: torch.Tensor | None = None  # (V,) substitution distribution (set_token_counts)
        self.corrector = float(getattr(d, "corrector", 0.0))
        self.corrector_weight = float(getattr(d, "corrector_weight", 1.0))
        if not 0.0 <= self.corrector < 1.0:
            raise ValueError(f"diffusion.corrector must be in [0, 1), got {self.corrector}")
        self._encode_ids = None  # decoder ids (B, L) -> (B, De) re-embedded vectors (set_hypothesis_encoder)
        self.self_condition = bool(getattr(cfg.model, "self_condition", False))
        self.self_condition_prob = float(getattr(cfg.model, "self_condition_prob", 0.5))
        SampledSoftmax.__init__(self)

    def set_token_counts(self, counts) -> None:
        """Training-corpus count of every decoder id (V,): the sampled softmax's columns and the unigram
        distribution substitutions are drawn from (specials PAD / MASK / EOS never drawn)."""
        SampledSoftmax.set_token_counts(self, counts)
        if self.substitute > 0:
            if counts is None:
                raise ValueError("diffusion.substitute > 0 needs the vocabulary's training token counts; this "
                                 "vocabulary has none (rebuild it, or set diffusion.substitute: 0)")
            p = torch.as_tensor(counts, dtype=torch.float64).clamp(min=0).float()
            p[[PAD_ID, MASK_ID, EOS_ID]] = 0.0
            if float(p.sum()) <= 0:
                raise ValueError("diffusion.substitute: the token counts hold no ordinary token")
            self._unigram = p / p.sum()

    def substitute_ids(self, model: ModelFn, x_t, x0, masked, z, generator=None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor]:
        """x_t with each visible token position (x0 not PAD) replaced w.p. self.substitute by a drawn id (see the
        module docstring); the visible positions to score (B, L) bool: every substituted one and each other one
        w.p. CLEAN_SCORED; and the scored positions' loss weights (B, L) float (1 / CLEAN_SCORED for the others)."""
        if self._unigram is None:
            raise RuntimeError("diffusion.substitute > 0 needs the training token counts: call "
                               "process.set_token_counts(counts)")
        B, L = x0.shape
        visible = ~masked & (x0 != self.pad_id)
        sub = visible & (torch.rand(x0.shape, device=x0.device, generator=generator) < self.substitute)
        draws = torch.multinomial(self._unigram.to(x0.device).expand(B, -1), L, replacement=True,
                                  generator=generator)  # (B, L)
        bow = getattr(model, "bow_logits", None)
        if bow is not None and getattr(model, "bow_mlp", None) is not None:
            with torch.no_grad():
                logits = bow(z).float()
                logits[:, [PAD_ID, MASK_ID, EOS_ID]] = float("-inf")
                topical = torch.multinomial(logits.softmax(-1), L, replacement=True, generator=generator)
            half = torch.rand(x0.shape, device=x0.device, generator=generator) < 0.5
            draws = torch.where(half, topical, draws)
        clean = visible & ~sub & (torch.rand(x0.shape, device=x0.device, generator=generator) < CLEAN_SCORED)
        weight = torch.where(clean, 1.0 / CLEAN_SCORED, 1.0)
        return torch.where(sub, draws, x_t), sub | clean, weight

    def set_hypothesis_encoder(self, fn) -> None:
        """fn: decoder ids (B, L) long -> (B, De) float32, the frozen encoder's vectors of the texts the rows
        spell. The corrector rows (diffusion.corrector > 0) re-embed their hypotheses with it."""
        self._encode_ids = fn

    @torch.no_grad()
    def hypotheses(self, model: ModelFn, x0, z, generator=None) -> torch.Tensor:
        """x0 (B, L) masked at stratified times in [1/2, 1] (cosine schedule: 29-100 % masked), the masked positions
        filled with the model's conditional argmax (full vocabulary, [MASK] excluded): the corrector rows'
        hypotheses (B, L). The upper half of the times makes them mostly the model's own words (36-73 % of their
        tokens right over the logged windows of round 24's runs, bench/RESULTS.md)."""
        B, L = x0.shape
        t = 0.5 + 0.5 * stratified_times(B, self.eps, x0.device, generator)
        x_t, masked = self.corrupt(x0, t, generator)
        t_model = self.model_time(self.time_of_mask_ratio(masked.sum(dim=1).float() / L))
        fill = exclude_class(model(x_t, t_model, z, select=masked), self.mask_id).argmax(-1)
        return x_t.masked_scatter(masked, fill)

    def corrector_terms(self, model: ModelFn, x0, z, uncond, generator=None, sampled: bool = False):
        """The corrector rows' loss (see the module docstring): their weighted mean cross-entropy (scalar) and
        metrics (corrector_ce; hyp_acc: the hypotheses' share of right tokens where x_0 is not PAD)."""
        if self._encode_ids is None:
            raise RuntimeError("diffusion.corrector > 0 needs the frozen encoder: call "
                               "process.set_hypothesis_encoder(fn)")
        B, L = x0.shape
        hyp = self.hypotheses(model, x0, z.detach(), generator)
        # (B, De); cloned: an encoder may hand back an inference-mode tensor, which autograd cannot save
        e_hyp = self._encode_ids(hyp).to(device=z.device, dtype=torch.float32).clone()
        zc = model.hypothesis_latent(z, e_hyp)
        ratio = 0.5 * (1.0 - torch.rand(B, device=x0.device, generator=generator))  # (0, 1/2]
        masked = torch.rand(x0.shape, device=x0.device, generator=generator) < ratio[:, None]
        x_c = hyp.masked_fill(masked, self.mask_id)
        t_model = self.model_time(self.time_of_mask_ratio(masked.sum(dim=1).float() / L))
        both_pad = (x0 == self.pad_id) & (hyp == self.pad_id)
        wrong = ~masked & (hyp != x0)
        clean = ~masked & ~wrong & ~both_pad & (
            torch.rand(x0.shape, device=x0.device, generator=generator) < CLEAN_SCORED)
        scored = masked | wrong | clean
        target = x0[scored]
        if sampled:
            logits, target = self.sampled_logits(model, x_c, t_model, zc, uncond, scored, target, generator)
        else:
            logits = exclude_class(model(x_c, t_model, zc, uncond=uncond, select=scored), self.mask_id)
        ce = F.cross_entropy(logits, target, reduction="none")  # (N,)
        weight = torch.where(clean, 1.0 / CLEAN_SCORED, 1.0)[scored]
        loss = (ce * weight).sum() / weight.sum().clamp(min=1.0)
        real = x0 != self.pad_id
        metrics = {"corrector_ce": float(loss.detach()),
                   "hyp_acc": float(((hyp == x0) & real).sum() / real.sum().clamp(min=1))}
        return loss, metrics

    # -----------------------------------------------------------------------------------------------------
    # pieces

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input for diffusion time t (the identity here)."""
        return t

    def time_of_mask_ratio(self, mask_ratio: torch.Tensor) -> torch.Tensor:
        """Fraction of masked positions (B,) -> the time whose keep probability is 1 - mask_ratio."""
        return self.schedule.inverse(1.0 - mask_ratio.float())

    def corrupt(
        self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, L), t (B,) -> x_t (B, L) with each position masked w.p. 1 - alpha(t), and the mask (B, L)."""
        p = self.schedule.mask_prob(t.float())  # (B,)
        masked = torch.rand(x0.shape, device=x0.device, generator=generator) < p[:, None]
        return x0.masked_fill(masked, self.mask_id), masked

    def _terms(self, model: ModelFn, x0, z, uncond, t, generator=None, sampled: bool = False,
               substitute: bool = False):
        """One corruption at times t and the per-token cross-entropies at the masked positions.

        sampled: the sampled softmax of diffusion.softmax_sample (training only); the returned logits are then
        (N, C + 1) over the step's columns and the own target (last), and the returned target indexes them.
        substitute: substitution noise (diffusion.substitute); visible token positions are scored too and their
        cross-entropies and loss weights returned as the last item, (2, N_visible) (else None). logits / target / ce
        are the masked positions'."""
        B, L = x0.shape
        x_t, masked = self.corrupt(x0, t, generator)
        n_masked = masked.sum(dim=1)  # (B,)
        t_model = self.model_time(self.time_of_mask_ratio(n_masked.float() / L))
        scored, visible = masked, None
        if substitute:
            x_t, visible, vis_weight = self.substitute_ids(model, x_t, x0, masked, z, generator)
            scored = masked | visible
        target = x0[scored]  # (N,)
        extra = {}
        if self.self_condition and getattr(model, "self_condition", False):
            prob = self.self_condition_prob if torch.is_grad_enabled() else 1.0
            sc = self.estimate(model, x_t, t_model, z, uncond, prob, generator)
            if sc is not None:
                extra["sc"] = sc
        if sampled:  # (N, C + 1); the own target is the last column
            logits, target = self.sampled_logits(model, x_t, t_model, z, uncond, scored, target, generator, **extra)
        else:
            logits = model(x_t, t_model, z, uncond=uncond, select=scored, **extra)  # (N, V), N = scored.sum()
            logits = exclude_class(logits, self.mask_id)
        ce = F.cross_entropy(logits, target, reduction="none")  # (N,) float32
        ce_visible = None
        if visible is not None:  # split the scored positions (row-major order) into masked and visible ones
            is_masked = masked[scored]
            ce_visible = torch.stack([ce[~is_masked], vis_weight[visible]])  # (2, N_visible): CE, weight
            logits, target, ce = logits[is_masked], target[is_masked], ce[is_masked]
        row = torch.arange(B, device=x0.device).repeat_interleave(n_masked)  # (N,) sequence of each row
        ce_sum = torch.zeros(B, device=x0.device, dtype=ce.dtype).index_add(0, row, ce)  # (B,)
        nll = self.schedule.weight(t.float()) * ce_sum / L  # (B,) per-token ELBO term
        return logits, target, ce, nll, masked, ce_visible

    @staticmethod
    def estimate(model, x_t, t_model, z, uncond, prob: float, generator=None) -> torch.Tensor | None:
        """Self-conditioning input for a training or validation pass: the model's own output features (no
        gradient) for a random `prob` share of the rows, zeros for the rest (as at the first sampling step, which
        has no previous estimate); None when no row is drawn. x_t (B, L) -> (B, L, D)."""
        B = x_t.shape[0]
        if prob >= 1.0:
            pick = torch.ones(B, dtype=torch.bool, device=x_t.device)
        else:
            pick = torch.rand(B, device=x_t.device, generator=generator) < prob
        if not bool(pick.any()):
            return None
        rows = pick.nonzero()[:, 0]
        with torch.no_grad():
            f = model.features(x_t[rows], t_model[rows], z[rows], None if uncond is None else uncond[rows])
        sc = f.new_zeros((B, *f.shape[1:]))
        sc[rows] = f
        return sc

    # -----------------------------------------------------------------------------------------------------
    # the Process interface

    def loss(
        self, model: ModelFn, x0: torch.Tensor, z: torch.Tensor, uncond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        sampled = self.softmax_sample > 0 and torch.is_grad_enabled()
        substitute = self.substitute > 0 and torch.is_grad_enabled()
        corrector_loss, corrector_metrics = None, {}
        if self.corrector > 0 and torch.is_grad_enabled() and x0.shape[0] > 1:  # split off the corrector rows
            n = min(x0.shape[0] - 1, max(1, round(self.corrector * x0.shape[0])))
            perm = torch.randperm(x0.shape[0], device=x0.device)
            rows, keep = perm[:n], perm[n:]
            corrector_loss, corrector_metrics = self.corrector_terms(
                model, x0[rows], z[rows], None if uncond is None else uncond[rows], sampled=sampled)
            x0, z, uncond = x0[keep], z[keep], None if uncond is None else uncond[keep]
        B, L = x0.shape
        t = stratified_times(B, self.eps, x0.device)
        logits, target, ce, nll, masked, ce_visible = self._terms(model, x0, z, uncond, t, sampled=sampled,
                                                                  substitute=substitute)
        N = ce.shape[0]
        if self.weighting == "elbo":
            loss = nll.mean()
        elif N > 0:
            loss = ce.mean()
        else:  # nothing masked in the whole batch: a zero that still reaches the graph
            loss = logits.sum() * 0.0
        visible_ce = None
        if ce_visible is not None and ce_visible.shape[1] > 0:  # the weighted mean over the visible tokens
            visible_ce = (ce_visible[0] * ce_visible[1]).sum() / ce_visible[1].sum()
            loss = loss + self.substitute_weight * visible_ce
        if corrector_loss is not None:
            loss = loss + self.corrector_weight * corrector_loss
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean() if N > 0 else torch.tensor(float("nan"))
            metrics = {
                "loss": float(loss.detach()),
                "acc": float(acc),
                "ce": float(ce.mean()) if N > 0 else float("nan"),
                "nll": float(nll.mean()),
                "mask_frac": float(masked.float().mean()),
            }
            metrics.update(corrector_metrics)
            if ce_visible is not None:
                metrics["visible_ce"] = float(visible_ce) if visible_ce is not None else float("nan")
        return loss, metrics

    def clean_logits(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        mask_ratio: torch.Tensor,
        z: torch.Tensor,
        uncond: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        sc: torch.Tensor | None = None,
        return_features: bool = False,
        shortlist: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv=None,
        widths: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits of p(x_0 | x_t), float32, [MASK] excluded; (B, L, V) or (N, V) at the selected positions.
        `kv` (sgdd.models.decoder.KVState) passes through to the model (decoding with reused keys / values), as do
        `widths` (B,) (each row's own width, Decoder.forward).
        With a self-conditioned model: `sc` is the previous estimate's features, and `return_features` returns
        (logits, features) (see Decoder.forward). With a `shortlist` (shared ids, per-row ids) the logits are
        (N, F + K) over those ids (the caller keeps [MASK] out of them)."""
        t = self.model_time(self.time_of_mask_ratio(mask_ratio.to(x_t.device)))
        kw = {}
        if sc is not None or return_features:
            kw.update(sc=sc, return_features=return_features)
        if shortlist is not None:
            kw["shortlist"] = shortlist
        if kv is not None:
            kw["kv"] = kv
        if widths is not None:
            kw["widths"] = widths
        out = model(x_t, t, z, uncond=uncond, select=select, **kw)
        logits, feats = out if return_features else (out, None)
        logits = logits.float() if shortlist is not None else exclude_class(logits, self.mask_id)
        return logits if feats is None else (logits, feats)

    @torch.no_grad()
    def nll(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        z: torch.Tensor,
        num_t: int = 8,
        seed: int = 0,
    ) -> torch.Tensor:
        """Deterministic per-token NLL bound (B,): the ELBO integral over t by the midpoint rule on num_t
        points of [eps, 1], masks drawn from a seeded generator. num_t model calls."""
        B, _ = x0.shape
        gen = torch.Generator(device=x0.device).manual_seed(seed)
        total = torch.zeros(B, device=x0.device)
        for k in range(num_t):
            t = torch.full((B,), self.eps + (1.0 - self.eps) * (k + 0.5) / num_t, device=x0.device)
            total += self._terms(model, x0, z, None, t, gen)[3]  # never substitutes
        return total * (1.0 - self.eps) / num_t
