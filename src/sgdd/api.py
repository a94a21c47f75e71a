"""The Python API: `from sgdd import SGDD`.

    model = SGDD.from_pretrained("checkpoints/quickstart/best")
    model.reconstruct(["The cat sat on the mat."])          # -> ["the cat sat on the mat."]
    model.paraphrase(["The cat sat on the mat."], n=5)       # -> [[five strings]]
    model.interpolate("A sentence.", "Another one.", n=5)    # -> five strings
    model.encode(["..."])                                    # -> FloatTensor (N, De), the frozen encoder's vectors

Everything is batched and returns plain strings. The frozen encoder is loaded on first use.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sgdd.checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from sgdd.config import Config
from sgdd.generation import choose_lengths, decode_sorted
from sgdd.registry import ConfigError

log = logging.getLogger("sgdd")


class InputError(ConfigError):
    """Bad user input (empty sentence, undecodable file...): a one-line message, no traceback."""


def check_texts(texts: list[str]) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise InputError("no input sentences were given")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"input {i + 1} is not a string: {t!r}")
        if not t.strip():
            raise InputError(f"input {i + 1} is empty or whitespace only; give a sentence")
    return [t.strip() for t in texts]


class SGDD:
    def __init__(self, cfg: Config, net, vocab, device: str | torch.device = "cpu", source: Path | None = None):
        from sgdd.diffusion import build_process

        self.cfg = cfg
        self.net = net.eval()
        self.vocab = vocab
        self.device = torch.device(device)
        self.process = build_process(cfg)
        self.source = source
        self._encoder = None

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, ema: bool = True) -> SGDD:
        from sgdd.cli import tune_malloc
        from sgdd.data import Vocab
        from sgdd.models import SGDDNet

        # the allocator settings the command-line tools use (sgdd.cli.tune_malloc; SGDD_MALLOPT=0 keeps the
        # process's own): without them decoding here ran 1.25x slower, page-faulting its large tensors anew
        tune_malloc()
        ckpt = load_checkpoint(path)
        cfg = ckpt.config
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        _inference_precision(cfg, device)
        encoder_dim = _encoder_dim_from_state(ckpt.model_state)
        tokenizer = _load_tokenizer(cfg)
        vocab = Vocab.load(ckpt.vocab_path, tokenizer)
        net = SGDDNet(cfg, len(vocab), encoder_dim, pretrained=None, encoder_ids=vocab.encoder_ids)
        if ckpt.ema_state is not None:  # check both weight files against the config, not only the one used
            load_weights_into(net, ckpt.model_state, str(ckpt.path / "model.safetensors"))
        load_weights_into(net, ckpt.weights(ema), str(ckpt.path))
        return cls(cfg, net.to(device), vocab, device, source=ckpt.path)

    def save_pretrained(self, path: str | Path) -> Path:
        """Weights (as EMA and raw, both the loaded ones), config, vocabulary; no optimizer state."""
        state = self.net.state_dict()
        tmp_vocab = Path(path).parent / f".{Path(path).name}.vocab.json"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.vocab.save(tmp_vocab)
        try:
            return save_checkpoint(path, config=self.cfg, model_state=state, ema_state=state, vocab_file=tmp_vocab,
                                   meta={"kind": "export", "source": str(self.source) if self.source else None})
        finally:
            tmp_vocab.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------- encoder
    @property
    def encoder(self):
        if self._encoder is None:
            from sgdd.encoders import build_encoder

            self._encoder = build_encoder(self.cfg.encoder, device=self.device)
        return self._encoder

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, De) frozen-encoder vectors, float32."""
        texts = check_texts(texts)
        return self.encoder.encode(texts, batch_size=self.cfg.encoder.batch_size).float()

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) decoder ids -> (B, De) vectors of the texts they spell (sgdd.encoders.encode_ids)."""
        from sgdd.encoders import encode_ids

        return encode_ids(self.encoder, self.vocab, ids, self.cfg.encoder.batch_size).to(self.device)

    def _warn_long(self, texts: list[str]) -> None:
        limit = self.cfg.data.max_length - 1
        for i, t in enumerate(texts):
            n = len(self.vocab.encode(t))
            if n > limit:
                log.warning("input %d has %d tokens; the model generates at most %d, so its output is truncated",
                            i + 1, n, limit)

    @torch.no_grad()
    def latents(self, texts: list[str]) -> torch.Tensor:
        """Posterior means (N, Dz)."""
        e = self.encode(texts).to(self.device)
        mu, _ = self.net.vib.posterior(e)
        return mu.float()

    # ---------------------------------------------------------------------------------------------- generation
    def _sampling_cfg(self, **overrides) -> Config:
        fields = {f.name for f in dataclasses.fields(self.cfg.sampling)}
        clean = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(clean) - fields
        if unknown:
            raise InputError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; valid: {', '.join(sorted(fields))}")
        sampling = dataclasses.replace(self.cfg.sampling, **clean)
        from sgdd.config import validate_config

        cfg = dataclasses.replace(self.cfg, sampling=sampling)
        validate_config(cfg, "sampling options")
        return cfg

    def _decode(self, z: torch.Tensor, cfg: Config, seed: int, callback=None, lengths=None) -> list[str]:
        from sgdd.sampling import build_sampler

        sampler = build_sampler(cfg, token_counts=self.vocab.counts)
        if getattr(self.net.decoder, "hyp_proj", None) is not None and hasattr(sampler, "hypothesis_fn"):
            sampler.hypothesis_fn = self._encode_ids  # trained corrector: correction rounds see the hypothesis
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return decode_sorted(self.net, self.process, sampler, self.vocab, z, cfg, cfg.sampling.batch_size,
                             generator=gen, callback=callback, lengths=lengths)

    @torch.no_grad()
    def reconstruct(self, texts: list[str], seed: int = 0, callback=None, **sampling) -> list[str]:
        """Decode each sentence's posterior mean. sampling: steps, cfg_scale, temperature, top_k, top_p, greedy,
        rerank, refine, sampler, ... (SamplingConfig fields). rerank K > 1 decodes K candidates per input and keeps
        the one whose re-encoded vector is closest to the input's; refine R > 0 then edits the result for R rounds
        of encoder-guided hill climbing (sgdd.sampling.refine). Inputs are decoded in batches of similar predicted
        length; callback(step, x (b, L), rows) sees every denoising step of each batch, rows = the input indices
        of x's rows."""
        texts = check_texts(texts)
        self._warn_long(texts)
        cfg = self._sampling_cfg(**sampling)
        e = self.encode(texts).to(self.device)
        mu, _ = self.net.vib.posterior(e)
        K = cfg.sampling.rerank
        out = self._decode(mu, cfg, seed, callback) if K <= 1 else self._rerank(texts, e, mu, cfg, K, seed)
        if cfg.sampling.refine > 0:
            out = self._refine(out, e, mu, cfg, seed)
        return out

    def _refine(self, start: list[str], e: torch.Tensor, mu: torch.Tensor, cfg: Config, seed: int) -> list[str]:
        """Encoder-guided refinement of the decoded texts (sgdd.sampling.refine): the hypotheses re-tokenised
        into a slot of their length + EOS + 2 spare positions, then `sampling.refine` rounds of hill climbing."""
        import torch.nn.functional as F

        from sgdd.data import make_batch
        from sgdd.precision import autocast
        from sgdd.sampling.base import pad_tail
        from sgdd.sampling.maskgit import MaskGITSampler
        from sgdd.sampling.refine import refine

        s = cfg.sampling
        spare, L = 2, cfg.data.max_length
        ids = [self.vocab.encode(t)[: L - 1] for t in start]
        # tokens, EOS, PAD: longest + 1 + 2 spare positions + the visible PAD tail every decode gets
        x = make_batch(ids, L, spare + pad_tail(cfg)).to(self.device)
        C = s.refine_candidates
        fill_cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(
            s, sampler="maskgit", steps=s.refine_steps, gumbel_noise=max(s.gumbel_noise, 1.0), remask=0.0,
            correct=0))
        sampler = MaskGITSampler(fill_cfg, token_counts=self.vocab.counts)
        z_rows = mu.repeat_interleave(C, 0)
        gen = torch.Generator(device=self.device).manual_seed(seed + 7)
        target = e.float().to(self.device)

        def fill(xm: torch.Tensor) -> torch.Tensor:
            out = []
            for i in range(0, xm.shape[0], s.batch_size):
                with autocast(cfg.training.precision, self.device):
                    out.append(sampler.sample(self.net.decoder, self.process, z_rows[i : i + s.batch_size], None,
                                              s.cfg_scale, generator=gen, init=xm[i : i + s.batch_size]))
            return torch.cat(out)

        def score(rows_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return F.cosine_similarity(self._encode_ids(rows_ids), target[rows], dim=-1)

        best, _, history = refine(x, fill, score, s.refine, C, s.refine_mask, self.process.mask_id,
                                  getattr(self.process, "pad_id", 0), spare, generator=gen)
        log.debug("refine: mean cosine by round %s", " ".join(f"{h:.4f}" for h in history))
        return [self.vocab.decode(r) for r in best.tolist()]

    def _rerank(self, texts, e, mu, cfg: Config, K: int, seed: int) -> list[str]:
        """Candidates: the default decode, then K - 1 decodes per input at other quantiles of the length head's
        distribution with annealed Gumbel confidence noise, all K - 1 in one batched sampler run (input-major
        rows); the frozen encoder picks the candidate closest to the input vector."""
        from sgdd.sampling.rerank import pick_best

        B = mu.shape[0]
        quantiles = torch.linspace(0.15, 0.95, K - 1).tolist()
        noisy = dataclasses.replace(cfg, sampling=dataclasses.replace(
            cfg.sampling, gumbel_noise=max(cfg.sampling.gumbel_noise, 1.0)))
        plain = self._decode(mu, cfg, seed)
        lengths = torch.stack([choose_lengths(self.net, mu, cfg, q) for q in quantiles], dim=1)  # (B, K - 1)
        flat = self._decode(mu.repeat_interleave(K - 1, 0), noisy, seed + 1, lengths=lengths.reshape(-1))
        cands = [[plain[i], *flat[i * (K - 1) : (i + 1) * (K - 1)]] for i in range(B)]
        chosen, _ = pick_best(cands, e.float().cpu(), lambda xs: self.encoder.encode(xs).float().cpu())
        return chosen

    @torch.no_grad()
    def paraphrase(self, texts: list[str], n: int = 5, temperature: float = 1.0, cfg_scale: float | None = None,
                   seed: int = 0, **sampling) -> list[list[str]]:
        """n stochastic decodes per input: z drawn from the VIB posterior, tokens sampled at `temperature`."""
        texts = check_texts(texts)
        if n < 1:
            raise InputError(f"n must be at least 1, got {n}")
        cfg = self._sampling_cfg(temperature=temperature, cfg_scale=cfg_scale, greedy=False, **sampling)
        e = self.encode(texts).to(self.device)
        mu, logvar = self.net.vib.posterior(e)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        std = (0.5 * logvar.float()).exp()
        z = mu.repeat_interleave(n, 0) + std.repeat_interleave(n, 0) * torch.randn(
            mu.shape[0] * n, mu.shape[1], generator=gen, device=gen.device)
        flat = self._decode(z, cfg, seed)
        return [flat[i * n : (i + 1) * n] for i in range(len(texts))]

    @torch.no_grad()
    def interpolate(self, a: str, b: str, n: int = 5, seed: int = 0, **sampling) -> list[str]:
        """n decodes along the straight line between the two sentences' posterior means (ends included)."""
        if n < 2:
            raise InputError(f"n must be at least 2 to interpolate, got {n}")
        cfg = self._sampling_cfg(**sampling)
        mu = self.latents([a, b])
        w = torch.linspace(0, 1, n, device=mu.device).unsqueeze(1)  # (n, 1)
        z = (1 - w) * mu[0:1] + w * mu[1:2]
        return self._decode(z, cfg, seed)


def _inference_precision(cfg: Config, device: str) -> None:
    """A checkpoint trained with an explicit bf16 decodes and encodes in `auto` (fp32) on a device where bf16 is
    slow (emulated bf16 on an AVX2-only CPU is hundreds of times slower); nothing else changes. The change is in
    the loaded config, so save_pretrained of such a model writes precision: auto (bf16 again where it is fast)."""
    from sgdd.precision import bf16_is_fast

    for name, section in (("training", cfg.training), ("encoder", cfg.encoder)):
        if section.precision == "bf16" and not bf16_is_fast(device):
            log.info("%s.precision of this checkpoint is bf16, which is slow on %s: running in fp32 (auto) instead",
                     name, device)
            section.precision = "auto"


def _encoder_dim_from_state(state: dict[str, torch.Tensor]) -> int:
    """The VIB's input width (the encoder dimension), read from its first weight."""
    for k, v in state.items():
        if k.startswith("vib.") and k.endswith("weight") and v.ndim == 2:
            return int(v.shape[1])
    raise ConfigError("checkpoint weights have no VIB layer: not an SGDD checkpoint")


def _load_tokenizer(cfg: Config):
    from sgdd.encoders import load_tokenizer

    return load_tokenizer(cfg.encoder)  # one clear error when the hub is unreachable


__all__ = ["SGDD", "InputError", "check_texts"]
