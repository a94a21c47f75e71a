"""Reverse-time samplers for the score-entropy (SEDD) process: the shared loop and the Euler step.

The loop (ScoreSampler) runs K = sampling.steps steps (a model evaluation each; fewer on the absorbing graph, below)
on the time grid
t_0 = 1 > t_1 > ... > t_{K-1} = eps (linear in t, or in the masked fraction with sampling.time_grid: masked,
see time_grid; the model is fed t, see sgdd.diffusion.score_entropy):

  start   x ~ the graph's limit (all MASK for absorbing, uniform over the states for uniform) on the first
          lengths[i] positions of each row, PAD beyond (never touched);
  k < K   one reverse step t_{k-1} -> t_k of the subclass (Euler here, Tweedie in sgdd.sampling.analytic);
  k = K   the final denoising step: the Tweedie step from sigma_bar(eps) to 0 with MASK excluded, so no MASK
          is left (absorbing) and a clean token is chosen at every position.

Each step evaluates the classifier-free-guided model (sgdd.sampling.guidance.guided, one forward of 2B rows)
only at the positions that can move (masked ones for absorbing, the first lengths[i] for uniform) and turns
its output into log-scores with process.log_scores. Guidance therefore combines raw outputs: for the uniform
graph those are the log-scores themselves; for the absorbing graph the guided logits are renormalised
(log p_guided(x0 | x_t) = log_softmax(l_null + s (l_cond - l_null))) before the -log(e^sigma_bar - 1) shift, which
keeps the unmasking rate that of the noise schedule. s = 1 is the conditional model exactly.

Per position the step gives unnormalised probabilities q (V,) of the next token (q[x] = stay). Sampling:
greedy: false, temperature 1 draws from q (Gumbel-max in float64). Otherwise the move/stay decision is drawn
with probability 1 - q[x] / sum q, and the destination is the argmax (greedy) or a draw from q^(1/T) over
y != x; the final step takes argmax q (greedy) or a draw from q^(1/T). top_k / top_p are MaskGIT options and
are not used here. callback(k, x) sees the state after every step k = 1..K.

Absorbing graph: there q is "unmask with a probability set by the noise schedule alone (move_prob), into a token
drawn from p(x0 | x_t)", so the loop draws exactly that: the step at which each masked position unmasks, drawn
before decoding (unmask_steps), then at each step the model only for the rows with an unmasking position, scored
only there (no (V,) probabilities per masked position, and no model call in a step where nothing unmasks). Same
distribution and sampling rules; a different random stream. There MaskGIT's key / value reuse
(sampling.kv_refresh) and null-pass reuse (sampling.guidance_refresh) apply too (ScoreSampler._sample_absorbing).

Repetition penalty (sampling.repeat_penalty, absorbing graph): as in MaskGIT, the guided logits of ids already
visible in the row are lowered per visible copy (PAD, EOS and the sampling.repeat_exempt most frequent ids aside)
before they are normalised into scores; the unmasking rate is unchanged, the choice of token is not.

Row widths (sampling.row_widths, as in MaskGIT): each row is decoded at its own width, its slots +
sampling.pad_tail, as if alone in its batch (Decoder.forward's widths); off, every row is L wide.

Euler step (t -> t - dt): q_y = dt sigma(t) Q[y, x] s_y for y != x, q_x = 1 - sum_{y != x} q_y (clamped >= 0).
"""

from __future__ import annotations

import torch

from sgdd.diffusion.score_entropy import PAD_ID, Graph, ScoreEntropyProcess, one_hot
from sgdd.registry import ConfigError
from sgdd.sampling.base import SAMPLERS, Sampler, penalize_repeats, slot_width
from sgdd.sampling.guidance import guided
from sgdd.sampling.maskgit import KVReuse, NullReuse, reuses_kv, reuses_null_pass

ROW_CHUNK_ELEMENTS = 1 << 23  # rows x V handled at once after the forward (the uniform graph moves every row)


def gumbel_argmax(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw per row from softmax(log_probs) (..., V) by the Gumbel-max trick in float64 -> (...) long."""
    u = torch.rand(log_probs.shape, dtype=torch.float64, device=log_probs.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float64).tiny)))
    return (log_probs.double() + gumbel).argmax(dim=-1)


def choose_next(
    probs: torch.Tensor,
    x: torch.Tensor,
    greedy: bool,
    temperature: float = 1.0,
    final: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from unnormalised transition probabilities probs (N, V) >= 0 at current tokens x (N,).

    Exact draw when greedy is False and temperature is 1; otherwise see the module docstring (the move/stay
    decision keeps its probability, only the destination is sharpened). final: choose among all entries.
    """
    if final and greedy:
        return probs.argmax(dim=-1)
    log_p = probs.double().clamp(min=0).log()  # (N, V) float64
    if final:
        return gumbel_argmax(log_p / temperature, generator)
    if not greedy and temperature == 1.0:
        return gumbel_argmax(log_p, generator)
    probs = probs.double().clamp(min=0)
    total = probs.sum(dim=-1)  # (N,)
    stay = probs.gather(-1, x[:, None]).squeeze(-1)
    move_log_p = log_p.scatter_(-1, x[:, None], float("-inf"))
    can_move = torch.isfinite(move_log_p).any(dim=-1)
    p_move = torch.where(total > 0, 1.0 - stay / total.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
    dest = move_log_p.argmax(dim=-1) if greedy else gumbel_argmax(move_log_p / temperature, generator)
    return torch.where((u < p_move) & can_move, dest, x)


TIME_GRIDS = ("uniform", "masked")  # sampling.time_grid's choices (config._CHOICES mirrors them, tested)


def time_grid(process: ScoreEntropyProcess, K: int, kind: str = "uniform") -> list[float]:
    """The K times t_0 = 1 > ... > t_{K-1} = t_min a score sampler visits (sampling.time_grid).

    uniform: evenly spaced in t. masked: evenly spaced in the masked fraction m(t) = 1 - e^-sigma_bar(t) (the
    absorbing graph's masked fraction; on the uniform graph (N - 1) / N of it is the expected fraction of positions
    changed), so on the absorbing graph each step unmasks an equal expected share whatever the noise. Under
    loglinear noise m is linear in t and the two grids agree."""
    t_min = max(process.eps, 1.0e-5)  # the final step needs sigma_bar(t_min) > 0
    if kind not in TIME_GRIDS:
        raise ConfigError(f"sampling.time_grid must be one of {list(TIME_GRIDS)}, got {kind!r}")
    if kind == "uniform" or K < 2:
        return torch.linspace(1.0, t_min, K, dtype=torch.float64).tolist()
    ends = torch.tensor([1.0, t_min], dtype=torch.float64)
    m_hi, m_lo = (-torch.expm1(-process.noise.total(ends))).tolist()
    m = torch.linspace(m_hi, m_lo, K, dtype=torch.float64)
    ts = process.noise.t_of_total(-torch.log1p(-m)).tolist()
    ts[0], ts[-1] = 1.0, t_min
    return ts


class ScoreSampler(Sampler):
    """The reverse-time loop shared by the Euler and analytic samplers; subclasses define step_probs."""

    name = "score"

    def __init__(self, cfg, token_counts=None):
        super().__init__(cfg, token_counts)
        s = cfg.sampling
        if s.steps < 1:
            raise ConfigError(f"sampling.steps must be >= 1, got {s.steps}")
        if not s.greedy and s.temperature <= 0:
            raise ConfigError(
                f"sampling.temperature must be > 0 when sampling (greedy: false), got {s.temperature}"
            )

    def step_probs(
        self,
        process: ScoreEntropyProcess,
        graph: Graph,
        x: torch.Tensor,
        log_score: torch.Tensor,
        t: float,
        t_next: float,
    ) -> torch.Tensor:
        """x (N,) current tokens, log_score (N, V) float32 at time t -> unnormalised q (N, V) at t_next."""
        raise NotImplementedError

    def move_prob(self, process: ScoreEntropyProcess, t: float, t_next: float) -> float:
        """Absorbing graph: the probability (in [0, 1]) that a masked position unmasks in the step t -> t_next, the
        same for every position and independent of the model (its scores at MASK sum to 1 / (e^sigma_bar(t) - 1))."""
        raise NotImplementedError

    def _log_scores(self, model, process, x, sel, t, z, widths=None) -> torch.Tensor:
        B = x.shape[0]
        t_vec = torch.full((B,), float(t), device=x.device)
        return process.log_scores(model, x, t_vec, z, select=sel, widths=widths)  # (N, V) float32

    @torch.inference_mode()
    def sample(self, model, process, z, lengths, cfg_scale, generator=None, callback=None):
        """z (B, Dz), lengths (B,) long -> ids (B, L) long with L = slot_width(lengths); see sgdd.sampling.base."""
        if not isinstance(process, ScoreEntropyProcess):
            raise ConfigError(
                f"the {self.name} sampler needs diffusion.process = score_entropy, got {type(process).__name__}; "
                "use sampling.sampler = maskgit for the masked process"
            )
        s = self.cfg.sampling
        K = s.steps
        device = z.device
        B = z.shape[0]
        lengths = lengths.to(device=device, dtype=torch.long)
        if lengths.shape != (B,) or int(lengths.min()) < 1:
            raise ValueError(f"lengths must be (B,) = ({B},) positive integers, got {tuple(lengths.shape)}")
        L = slot_width(lengths, self.cfg)
        pad_id = getattr(process, "pad_id", PAD_ID)
        valid = torch.arange(L, device=device)[None, :] < lengths[:, None]  # (B, L)
        widths = self.row_widths(model, lengths)  # (B,) each row's own width, or None

        probe = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        graph = process.graph(process.resolve_vocab_size(model, probe, z))
        if s.repeat_penalty > 0 and graph.absorbing_id is None:
            raise ConfigError(
                f"sampling.repeat_penalty works with the absorbing graph only (the {self.name} sampler on the uniform "
                "graph has no distribution over clean tokens to penalise); set sampling.repeat_penalty: 0 "
                "(--repeat-penalty 0)"
            )

        x = graph.sample_limit((B, L), device=device, generator=generator)
        x = torch.where(valid, x, pad_id)
        ts = time_grid(process, K, s.time_grid)
        if graph.absorbing_id is not None:
            return self._sample_absorbing(model, process, graph, x, z, ts, widths, cfg_scale, generator, callback)

        step_model = guided(model, cfg_scale)

        # the graphs without an absorbing state (uniform): every slot can move at every step
        sel = valid
        for k in range(1, K + 1):
            if bool(sel.any()):
                x_rows = x[sel]  # (N,)
                log_score = self._log_scores(step_model, process, x, sel, ts[k - 1], z, widths)  # (N, V)
                new = torch.empty_like(x_rows)
                chunk = max(
                    1, ROW_CHUNK_ELEMENTS // log_score.shape[-1]
                )  # bounds the (rows, V) float64 temporaries
                for i in range(0, x_rows.shape[0], chunk):
                    rows, ls = x_rows[i : i + chunk], log_score[i : i + chunk]
                    if k < K:
                        probs = self.step_probs(process, graph, rows, ls, ts[k - 1], ts[k])
                    else:
                        probs = final_probs(process, graph, rows, ls, ts[k - 1])
                    new[i : i + chunk] = choose_next(probs, rows, s.greedy, s.temperature, k == K, generator)
                x = x.masked_scatter(sel, new)
            if callback is not None:
                callback(k, x)
        return x

    def unmask_steps(self, process: ScoreEntropyProcess, ts: list[float], shape, device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Absorbing graph: (shape) long, the step k in 1..K (K = len(ts)) at which each masked position unmasks.
        At step k < K a position still masked unmasks with probability move_prob(t_{k-1}, t_k), the same for every
        position and independent of the model, and the final step unmasks the rest; so the steps can be drawn
        before decoding (one uniform per position and step k < K, in step order)."""
        K = len(ts)
        at = torch.full(shape, K, dtype=torch.long, device=device)
        for k in range(1, K):
            p = self.move_prob(process, ts[k - 1], ts[k])
            u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
            at = torch.where((at == K) & (u < p), k, at)
        return at

    def _sample_absorbing(self, model, process, graph: Graph, x, z, ts, widths, cfg_scale, generator, callback):
        """The loop of `sample` on the absorbing graph, drawn as what it is there: each masked position unmasks at
        a step drawn from the noise schedule alone (unmask_steps: probability move_prob per step, all at the last),
        into a token from the guided p(x0 | x_t) (MASK excluded, repetition penalty applied): its argmax (greedy)
        or a draw from p^(1/T). The same distribution as building every masked position's (V,) transition
        probabilities, but the model runs only for rows with an unmasking position and scores only those
        positions, and the steps where nothing unmasks skip it.

        sampling.kv_refresh = R > 0 (as in MaskGIT): steps 1, 1 + R, ... run every position of the active rows and
        keep each block's keys / values; the other steps run only the unmasking positions and those whose id
        changed since their entry was computed (KVReuse). sampling.guidance_refresh = G > 0 with guidance: the null
        pass runs at steps 1, 1 + G, ... only, there at every masked position that unmasks before the next such
        step, whose guidance direction (conditional - null) is kept and added to the conditional pass at its own
        step (NullReuse). Both approximate, as in MaskGIT."""
        s = self.cfg.sampling
        mask_id, K = graph.absorbing_id, len(ts)
        B, L = x.shape
        device = x.device
        pad_id = getattr(process, "pad_id", PAD_ID)
        unmask_at = self.unmask_steps(process, ts, (B, L), device, generator)
        G = s.guidance_refresh
        nulls = None
        if reuses_null_pass(s, cfg_scale, bool(getattr(model, "self_condition", False))):
            nulls = NullReuse(G, cfg_scale, B, L, device)
            step_model, null_model = guided(model, 1.0), guided(model, 0.0)
        else:
            step_model = guided(model, cfg_scale)
        kv = KVReuse(s.kv_refresh, B, L, getattr(step_model, "passes", 1), device) if reuses_kv(s, model) else None
        exempt = self.exempt(graph.V, pad_id, device) if s.repeat_penalty > 0 else None
        for k in range(1, K + 1):
            masked = x == mask_id
            move = masked & (unmask_at == k)
            # a null-pass step scores every masked position unmasking before the next one (keeps its direction)
            refresh = nulls is not None and (k - 1) % G == 0
            scored = masked & (unmask_at < k + G) if refresh else move
            active = scored.any(dim=1)  # (B,) rows with a position to score
            if bool(active.any()):
                rows = slice(None) if bool(active.all()) else active.nonzero()[:, 0]
                x_in, sel, z_in = x[rows], scored[rows], z[rows]
                t_in = process.model_time(torch.full((x_in.shape[0],), float(ts[k - 1]), device=device))
                extra = {} if widths is None else {"widths": widths[rows]}

                def call(state=None, fn=step_model, x_in=x_in, t_in=t_in, z_in=z_in, sel=sel, extra=extra):
                    return fn(x_in, t_in, z_in, None, sel, **(extra if state is None else {**extra, "kv": state}))

                logits = (call() if kv is None else kv.logits(k, rows, x_in, sel, call)).float()  # (N, V)
                if nulls is not None:
                    logits = nulls.guide(k, logits, lambda: call(fn=null_model), x, scored, mask_id, forbid=mask_id)
                if exempt is not None:
                    logits = penalize_repeats(logits, x_in, sel, exempt, s.repeat_penalty, mask_id)
                logits[:, mask_id] = float("-inf")
                if refresh:  # only the positions unmasking now draw
                    logits = logits[move[rows][sel]]
                if s.greedy:
                    new = logits.argmax(dim=-1)
                else:
                    new = gumbel_argmax(torch.log_softmax(logits, dim=-1) / s.temperature, generator)
                x = x.masked_scatter(move, new)  # row-major order = the select order
            if callback is not None:
                callback(k, x)
        return x


def final_probs(
    process: ScoreEntropyProcess, graph: Graph, x: torch.Tensor, log_score: torch.Tensor, t: float
):
    """The denoising step t -> 0: Tweedie probabilities with dsigma = sigma_bar(t) (N, V). For graphs without an
    absorbing state (the absorbing graph's final step is _sample_absorbing's: every masked position unmasks)."""
    sigma = process.noise.total(torch.tensor(float(t), dtype=torch.float64)).float()
    return graph.tweedie_probs(x, log_score, sigma.to(log_score.device).expand(x.shape))


@SAMPLERS.register("euler")
class EulerSampler(ScoreSampler):
    """First-order (Euler / tau-leaping on the reverse rates) sampler; see the module docstring."""

    name = "euler"

    def move_prob(self, process, t, t_next):
        # q_y = dt sigma(t) s_y, summed over the tokens: dt sigma(t) / (e^sigma_bar(t) - 1); at most 1 (the stay
        # entry q_MASK = 1 - that is clamped at 0)
        tt = torch.tensor(float(t), dtype=torch.float64)
        p = (float(t) - float(t_next)) * process.noise.rate(tt) / torch.expm1(process.noise.total(tt))
        return min(1.0, float(p))

    def step_probs(self, process, graph, x, log_score, t, t_next):
        dt = float(t) - float(t_next)
        rate = process.noise.rate(torch.tensor(float(t), dtype=torch.float64)).item()
        score = log_score.exp()
        probs = one_hot(x, score.shape[-1], score.dtype) + (dt * rate) * graph.reverse_rate(x, score)
        return probs.clamp(min=0.0)
