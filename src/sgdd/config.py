"""Typed, nested run configuration: YAML in, strict keys and types, dotted command-line overrides.

A config is a tree of dataclasses (Config -> model, diffusion, data, encoder, training, sampling, tracking).
`load_config(path, overrides)` reads YAML, applies `a.b=value` overrides, checks every key and type, and
validates combinations. Unknown keys or wrong types raise ConfigError naming the key, the file and the
valid keys. `config_to_dict` gives the resolved config that goes into checkpoints and tracked runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sgdd.registry import ConfigError


@dataclass
class ModelConfig:
    """The conditioned decoder and its VIB head."""

    # "encoder": start embeddings / positions / transformer layers from the frozen encoder's weights
    # (BERT-style HF checkpoints); "scratch": random init. Sizes below are ignored for parts taken from
    # the encoder (hidden_size, num_heads, mlp size come from the encoder when init_from == "encoder").
    init_from: str = "encoder"
    num_layers: int = 6  # with init_from=encoder: uses the encoder's first num_layers layers
    hidden_size: int = 384
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    positions: str = "learned"  # learned | rope | both
    latent_dim: int = 256  # VIB latent size D_z
    prefix_tokens: int = 0  # z also enters as this many prefix tokens (0 = AdaLN only)
    # z also enters as this many context tokens that every position cross-attends to in every block (its own
    # query / key-value / output projections, the output zero at init; 0 = none)
    cross_tokens: int = 0
    # z also enters the input of every [MASK] position through a per-position linear map (zero at init): each
    # hidden position starts from its own guess of its token instead of the shared [MASK] embedding
    z_positions: bool = False
    # self-conditioning (masked process): every [MASK] input also sees the model's own previous estimate of that
    # position (its output features from the previous denoising step, through a zero-initialised map). In
    # training, a no-grad first pass on self_condition_prob of the rows supplies the estimate (the other rows
    # get none, like the first sampling step).
    self_condition: bool = False
    self_condition_prob: float = 0.5
    tie_embeddings: bool = True  # output layer shares the token embedding matrix
    length_head: bool = True  # predict the sentence length from z (used by samplers with length=predict)
    # bag-of-words head: z -> which vocabulary tokens the sentence contains (multi-label, trained with BCE);
    # its log-probabilities are added, with a learned scale, to the decoder's logits at every position
    bow_head: bool = True
    bow_weight: float = 1.0  # weight of the bag-of-words BCE (per target token) in the training loss
    # initial weight of the bag-of-words log-prior in the decoder's logits (learned; 1.0 = a product of experts
    # from step 0, sensible with training.latent_pretrain_steps > 0; 12-minute runs: see bench/RESULTS.md)
    bow_scale_init: float = 0.0
    # presence-logit offset (per token, learned) for tokens already visible in x_t: "will it occur again?" is
    # less likely than "does it occur?"; 0 = none
    bow_seen_init: float = 0.0
    kl_weight: float = 1.0e-3
    kl_warmup_steps: int = 1000
    cond_dropout: float = 0.1  # probability of replacing z by the learned null condition (CFG training)


@dataclass
class DiffusionConfig:
    process: str = "masked"  # masked | score_entropy
    # masked process
    schedule: str = "cosine"  # cosine | loglinear | sine
    loss_weighting: str = "elbo"  # elbo (MDLM weight, sum over masked tokens / tokens) | uniform (mean CE)
    # training-time sampled softmax (masked process): 0 = the full output product; K > 0 scores the K most
    # frequent training tokens, K // 2 others drawn uniformly (importance-corrected) and each row's own target.
    # Validation NLL and sampling always use the full vocabulary.
    softmax_sample: int = 0
    # masked process, training steps: each visible token is replaced w.p. substitute by a wrong id (half unigram,
    # half drawn from the bag-of-words head) and visible token positions are scored too, with weight
    # substitute_weight: the model learns which visible tokens do not belong. 0.15 at 60 minutes (fiction): BLEU
    # 9.99 vs 10.04 (16 steps CFG 1.5), 10.68 vs 10.77-11.07 (24 steps CFG 1.0), token F1 52.8 vs 51.4-51.6, NLL
    # 1.41 vs 1.45, 14 % fewer steps, one run; 10-minute quickstart, two seeds: BLEU 2.45 / 2.52 vs 1.93 / 1.83
    # (bench/RESULTS.md "Twenty-third round"). 0 = off
    substitute: float = 0.0
    substitute_weight: float = 1.0
    # masked process, training steps: a trained corrector. This share of each batch's rows becomes corrector rows:
    # the model's own one-step prediction from a random masking is the hypothesis, the frozen encoder re-embeds it,
    # and the decoder learns p(x_0 | hypothesis partly re-masked, z + W e_hyp) at the masked and the visible
    # positions (W: a zero-initialised map from the encoder space into the latent, model built with it whenever
    # corrector > 0). MaskGIT's self-correction rounds (sampling.correct) then condition on each round's
    # re-embedded hypothesis. corrector_weight scales their loss. 10-minute quickstart, two seeds, q = 0.25: 30 %
    # fewer steps, BLEU 2.16 / 2.20 vs 2.45 / 2.52 without, and correction gains nothing with or without the
    # hypothesis vector; fiction at 60 minutes, q = 0.125, one run: BLEU 9.19 vs 10.04 (16 steps CFG 1.5), 26 % fewer
    # steps, the vector's own share of 2 correction rounds +0.09 (bench/RESULTS.md "Twenty-fourth round"). 0 = off
    corrector: float = 0.0
    corrector_weight: float = 1.0
    # score-entropy process (SEDD)
    graph: str = "absorbing"  # absorbing | uniform
    noise: str = "loglinear"  # loglinear | cosine | geometric
    sigma_min: float = 1.0e-4
    sigma_max: float = 20.0
    eps: float = 1.0e-3  # t is drawn from [eps, 1]


@dataclass
class DataConfig:
    source: str = "wiki_sample"  # wiki_sample | text | disk | bookcorpus
    path: str = ""  # text: a file or glob (one sentence per line); disk: a save_to_disk folder
    hf_dataset: str = "bookcorpus"  # bookcorpus: the hub id
    hf_split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    valid_path: str = ""  # explicit validation file (one sentence per line); else a split of the corpus
    valid_size: int = 1000  # sentences held out when valid_path is empty
    max_sentences: int = 0  # 0 = all
    min_tokens: int = 4  # decoder tokens, end token excluded
    max_length: int = 64  # decoder tokens including the end-of-sentence token
    dedup: bool = True
    seed: int = 0
    cache_dir: str = "data/cache"
    prune_vocab: bool = True
    # training batches pad to (longest in batch + 1 + U{0..pad_slack}) positions, capped at max_length, so the
    # model learns to fill any spare positions after the end token with PAD. The slack's masked PADs also teach
    # it that an all-[MASK] row ends in PADs: with 12 the 12-minute fiction models ended sentences early (length
    # ratio 0.53-0.76), with 4 they did not (1.02-1.06, BLEU +1.4), but the 60-minute model with 4 wrote 8 % too
    # long and lost BLEU at the fiction config's decoding (bench/RESULTS.md "Tenth round")
    pad_slack: int = 12
    # > 0: draw the slack among those whose padded length is a multiple of this (or max_length), so training sees
    # a few distinct tensor sizes instead of one per length (8 with pad_slack 12: the mean slack stays 6).
    # Fiction config, one run each: 8 under glibc's malloc 1.07x the steps/s, 7.3 GB resident vs 10.8 after 15
    # minutes (still growing, slower); under tcmalloc 1.02x, 3.8-3.9 GB either way (bench/RESULTS.md "Twenty-sixth
    # round"). At 60 minutes (tcmalloc, one run) BLEU 9.88 vs 10.04-10.23 at 16 steps CFG 1.5, 10.49 vs 10.77-11.07
    # at the fiction config's decoding, NLL 1.54 vs 1.41-1.45 (bench/RESULTS.md "Twenty-seventh round"), so the
    # configs leave it off; under glibc it is the way to slow the heap's growth. 0 = off
    pad_multiple: int = 0
    bucket_by_length: bool = True


@dataclass
class EncoderConfig:
    backend: str = "transformers"  # transformers | flag
    name: str = "bundled-minilm"  # hub id, local folder, or bundled-minilm
    pooling: str = "mean"  # mean | cls
    normalize: bool = True
    max_length: int = 128  # encoder tokens
    batch_size: int = 128
    # auto (bf16 autocast where bf16 matmuls are fast: GPUs, AVX512-BF16/AMX CPUs; else fp32) | bf16 | fp32
    precision: str = "auto"


@dataclass
class TrainingConfig:
    run_name: str = "run"
    output_dir: str = "checkpoints"
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5.0e-4
    pretrained_lr_scale: float = 1.0  # LR factor for the weights copied from the encoder (init_from: encoder)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 200
    max_steps: int = 10000
    max_minutes: float = 0.0  # wall-clock budget; 0 = none. The LR schedule then follows elapsed time.
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"  # auto | bf16 | fp32 (see sgdd.precision: bf16 is ~400x slower on AVX2-only CPUs)
    seed: int = 0
    log_every: int = 50  # steps per log line; its loss and metrics are means over those steps (batches vary in length)
    eval_every: int = 1000
    save_every: int = 1000
    keep_last: int = 2  # step checkpoints kept besides latest/ and best/
    num_eval_sentences: int = 64  # validation sentences reconstructed through the sampler at each eval
    num_eval_batches: int = 8  # validation batches for loss / accuracy
    resume: str = ""  # "" | auto | PATH
    max_nonfinite: int = 10  # abort after this many non-finite losses in a row
    final_eval: bool = True  # run evaluation at the end of train.py and print BLEU + examples
    final_eval_sentences: int = 200  # 0 = no final evaluation (as final_eval: false)
    threads: int = 0  # torch.set_num_threads; 0 = leave as is
    # hand the heap's free pages back to the kernel every this many steps (glibc, sgdd.cli.trim_heap); 0 = never.
    # Training's resident memory grows by heap fragmentation (fiction config: 9.7 GB after 8 minutes, 12.8 GB
    # after 60; glibc's default settings grow as fast); 1 holds it at 2.3-4.2 GB for 23 % fewer steps, 10 near
    # 6.6 GB for ~7 % fewer, 50 lowers the resting size but not the peak (bench/RESULTS.md "Nineteenth round").
    # For glibc's malloc only: where tcmalloc is installed the scripts run with it (sgdd.cli.preload_allocator),
    # which holds the size flat without trimming ("Twenty-fifth round")
    heap_trim_every: int = 0
    # latent pre-training: before the decoder trains, the VIB and the bag-of-words head alone are fitted on the
    # cached vectors (no transformer in the step: ~50x the decoder's sentences/s). Its time counts towards
    # max_minutes. 0 = off.
    latent_pretrain_steps: int = 0
    latent_pretrain_batch: int = 512
    latent_pretrain_lr: float = 2.0e-3


@dataclass
class SamplingConfig:
    sampler: str = "maskgit"  # maskgit | euler | analytic
    steps: int = 16
    cfg_scale: float = 1.5  # 1 = conditional only, 0 = unconditional
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = True  # argmax tokens (reconstruction); False samples
    gumbel_noise: float = 0.0  # annealed Gumbel noise on confidences (MaskGIT), 0 = none
    remask: float = 0.0  # fraction of low-confidence decoded tokens re-masked per step (MaskGIT)
    # MaskGIT: a step commits at most one position per predicted token id in a row (the most confident; PAD
    # exempt); the others stay masked for a later step, which then sees the first copy
    dedupe: bool = False
    defer_end: bool = False  # MaskGIT: commit PAD / EOS predictions only after every content prediction
    # MaskGIT: how many positions stay masked after step k of K: cosine floor(n cos(pi/2 k/K)) | linear
    # floor(n (K - k) / K) (the masked fractions of a score-entropy model's log-linear noise). 60-minute models,
    # 1,000 held-out sentences: within 0.2 BLEU of each other on SEDD weights; linear +0.04 to +0.30 on three masked
    # models with the fiction config's knobs, which ship it (bench/RESULTS.md "Thirty-third / Thirty-fourth round")
    unmask_schedule: str = "cosine"
    # euler / analytic: the time grid, uniform in t | masked (uniform in the masked fraction 1 - e^-sigma_bar(t):
    # equal expected unmasking shares per step whatever the noise; the same grid as uniform under loglinear noise)
    time_grid: str = "uniform"
    # MaskGIT: subtracted from a prediction's log-confidence per position to its right (ranking only): 0 = pure
    # confidence order; large (e.g. 100) = left to right, a few tokens per step
    position_penalty: float = 0.0
    # MaskGIT: a token id already visible in the row has its logit lowered by this much per visible copy, except
    # PAD / EOS and the repeat_exempt most frequent training ids (function words, punctuation: from the
    # vocabulary's counts). Parallel decoding otherwise writes a salient content word into many positions. 0 = off
    repeat_penalty: float = 0.0
    repeat_exempt: int = 100
    length: str = "predict"  # predict (length head quantile + length_slack) | max (always data.max_length)
    length_quantile: float = 0.5  # decode this quantile of the length head's distribution ...
    length_slack: int = 2  # ... plus this many spare positions (the model ends the sentence itself)
    # visible PAD positions after the longest slot of a batch (capped at data.max_length); None = data.pad_slack
    # + 4. Training rows end in a PAD tail (the bucket's longest + 1 + up to data.pad_slack); decoded without one,
    # the model ends sentences early: 60-minute fiction model (pad_slack 12), length-sorted batches, 1,000
    # held-out sentences: tail 0 BLEU 6.04 (length ratio 0.67); tail 16 8.50 and 7.71 on their two halves (0.96
    # on the first) (bench/RESULTS.md "Seventh round")
    pad_tail: int | None = None
    # every sampler: each row is decoded at its own width (its slots + pad_tail, capped at data.max_length), as if
    # it were alone in its batch: the decoder's attention ignores the positions beyond it, and (MaskGIT) with
    # kv_refresh the full passes run only the positions inside the widths. false: every row is as wide as the batch's widest
    # (a row's output then depends on the other rows of its batch)
    row_widths: bool = True
    # MaskGIT: score only a shortlist of each row's vocabulary: the shortlist_frequent most frequent training ids
    # (PAD and EOS included) plus the `shortlist` ids the bag-of-words head ranks highest for the row's z. The
    # (D x V) output product is most of a sampling step; 0 = off (the whole vocabulary)
    shortlist: int = 0
    shortlist_frequent: int = 2048
    # MaskGIT, and the SEDD samplers on the absorbing graph: reuse keys / values across steps (approximate). 0 =
    # off: every step runs every position. r > 0: steps 1, 1 + r, 1 + 2r, ... run every position; the others run
    # only the positions scored (MaskGIT: the masked ones; SEDD: those unmasking) and those whose token changed
    # since they last ran, attending to the stored keys / values of the rest (PAD tail included).
    # Decoders with RoPE, self-conditioning or z_positions decode without reuse (a warning); prefix tokens are
    # run in the full passes and kept in between
    kv_refresh: int = 0
    # MaskGIT, and the SEDD samplers on the absorbing graph, with guidance: the null (unconditional) pass runs only
    # at steps 1, 1 + g, 1 + 2g, ...; the other steps run the conditional pass alone and add each masked
    # position's last guidance direction (conditional - null logits) (approximate; SEDD keeps it for the
    # positions that unmask before the next null pass). 0 = off: both passes at every step
    guidance_refresh: int = 0
    # MaskGIT self-correction after the last step: `correct` rounds of "score each decoded token by the model's
    # probability of it given the whole decoded row (one full pass), re-mask the correct_frac lowest-scoring
    # (at least one per row) and refill them in one step". 60-minute fiction models, 1,000 held-out sentences, 16
    # steps CFG 1.5: BLEU +0.22 / +0.24 for one round, +0.24 / +0.33 for two (without / with diffusion.substitute
    # in training), 27 % slower decoding per round; +0.04 / +0.07 at 24 steps CFG 1.0 (bench/RESULTS.md
    # "Twenty-third round"). 0 = off
    correct: int = 0
    correct_frac: float = 0.1
    rerank: int = 1  # best-of-K by re-embedding cosine; 1 = off
    # encoder-guided refinement (sgdd.sampling.refine): rounds of "re-mask a fraction of the hypothesis, refill
    # refine_candidates variants with MaskGIT in refine_steps steps, keep the one closest to the input's vector";
    # 0 = off. Needs a process with a MASK state.
    refine: int = 0
    refine_candidates: int = 8
    refine_mask: float = 0.25
    refine_steps: int = 4
    batch_size: int = 64


@dataclass
class TrackingConfig:
    mode: str = "auto"  # auto (online if WANDB_API_KEY is set, else offline) | online | offline | disabled
    project: str = "sgdd"
    entity: str = ""
    tags: list[str] = field(default_factory=list)
    dir: str = "wandb"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------------------
# building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently coerce: int -> float) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (list,):
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: '{key}' must be a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: '{key}' has the wrong type: got {value!r}, expected {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: '{key}' must be null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, bool):  # YAML 1.1: unquoted on/off/yes/no/true/false are booleans
                hint = (" (YAML reads unquoted on / off / yes / no as true / false: quote the value, e.g. "
                        f"{key.rsplit('.', 1)[-1]}: 'off' in a file, {key}=\"'off'\" on the command line)")
            if key in _CHOICES:
                hint += f"; one of: {', '.join(_CHOICES[key])}"
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}{hint}")
        return value
    raise ConfigError(f"{where}: '{key}' has unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key '{key}'; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, where)
        else:
            kwargs[name] = _coerce(value, tp, key, where)
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "<dict>") -> Config:
    cfg = _build(Config, data, "", where)
    validate_config(cfg, where)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.max_steps=200' -> (['training', 'max_steps'], 200); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. training.max_steps=200)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        cls: Any = Config
        for i, part in enumerate(path[:-1]):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(
                    f"override '{text}': unknown section '{'.'.join(path[: i + 1])}'; valid: {', '.join(sorted(names))}"
                )
            cls = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' is not a section")
            if node.get(part) is None:  # absent, or an empty section in the YAML (`model:` with nothing under it)
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' in the config is not a mapping")
            node = node[part]
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), apply dotted overrides, check and validate."""
    data: dict = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; the shipped configs are in configs/")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
    if overrides:
        where = f"{where} + overrides"
        data = apply_overrides(data, list(overrides))
    return config_from_dict(data, where)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# validation of values and combinations

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.init_from": ("encoder", "scratch"),
    "model.positions": ("learned", "rope", "both"),
    "diffusion.process": ("masked", "score_entropy"),
    "diffusion.loss_weighting": ("elbo", "uniform"),
    # these three mirror registries in sgdd.diffusion (a test keeps them in sync)
    "diffusion.schedule": ("cosine", "loglinear", "sine"),
    "diffusion.graph": ("absorbing", "uniform"),
    "diffusion.noise": ("loglinear", "cosine", "geometric"),
    "data.source": ("wiki_sample", "text", "disk", "bookcorpus"),
    "encoder.backend": ("transformers", "flag"),
    "encoder.pooling": ("mean", "cls"),
    "encoder.precision": ("auto", "bf16", "fp32"),
    "training.precision": ("auto", "bf16", "fp32"),
    "sampling.length": ("predict", "max"),
    "sampling.time_grid": ("uniform", "masked"),  # mirrors sgdd.sampling.euler.TIME_GRIDS (tested)
    "sampling.unmask_schedule": ("cosine", "linear"),  # mirrors sgdd.sampling.maskgit.UNMASK_SCHEDULES (tested)
    "tracking.mode": ("auto", "online", "offline", "disabled"),
}

# which samplers fit which (process, graph); schedules/noises/graphs are checked against their registries
SAMPLERS_FOR = {
    ("masked", None): ("maskgit",),
    ("score_entropy", "absorbing"): ("euler", "analytic", "maskgit"),
    ("score_entropy", "uniform"): ("euler", "analytic"),
}


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate_config(cfg: Config, where: str = "config") -> None:
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{where}: {key} = '{value}' is not valid; choose one of: {', '.join(choices)}")
    d = cfg.diffusion
    graph = d.graph if d.process == "score_entropy" else None
    samplers = SAMPLERS_FOR.get((d.process, graph))
    if samplers is None:
        raise ConfigError(f"{where}: diffusion.graph = '{d.graph}' is not valid; choose one of: absorbing, uniform")
    if cfg.sampling.sampler not in samplers:
        raise ConfigError(
            f"{where}: sampling.sampler = '{cfg.sampling.sampler}' does not fit diffusion.process = '{d.process}'"
            + (f" with graph '{graph}'" if graph else "")
            + f"; valid samplers: {', '.join(samplers)}"
        )
    positive = {
        "data.max_length": cfg.data.max_length,
        "training.batch_size": cfg.training.batch_size,
        "training.grad_accum": cfg.training.grad_accum,
        "sampling.steps": cfg.sampling.steps,
        "sampling.rerank": cfg.sampling.rerank,
        "sampling.refine_candidates": cfg.sampling.refine_candidates,
        "sampling.refine_steps": cfg.sampling.refine_steps,
        "sampling.batch_size": cfg.sampling.batch_size,
        "model.num_layers": cfg.model.num_layers,
        "model.latent_dim": cfg.model.latent_dim,
        "encoder.batch_size": cfg.encoder.batch_size,
        "training.latent_pretrain_batch": cfg.training.latent_pretrain_batch,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {value}")
    if cfg.data.min_tokens >= cfg.data.max_length:
        raise ConfigError(f"{where}: data.min_tokens ({cfg.data.min_tokens}) must be below data.max_length")
    if cfg.training.final_eval_sentences < 0:
        raise ConfigError(f"{where}: training.final_eval_sentences must be >= 0 (0 = no final evaluation), got "
                          f"{cfg.training.final_eval_sentences}")
    if cfg.training.eval_every > 0 and cfg.training.num_eval_sentences <= 0:
        raise ConfigError(f"{where}: training.num_eval_sentences must be positive when training.eval_every > 0 (got "
                          f"{cfg.training.num_eval_sentences}); set training.eval_every: 0 to skip the periodic "
                          f"evaluation")
    if cfg.data.pad_slack < 0 or cfg.data.pad_multiple < 0:
        raise ConfigError(f"{where}: data.pad_slack and data.pad_multiple must be >= 0 (pad_multiple 0 = off), got "
                          f"{cfg.data.pad_slack} and {cfg.data.pad_multiple}")
    if cfg.diffusion.softmax_sample < 0:
        raise ConfigError(f"{where}: diffusion.softmax_sample must be >= 0 (0 = full softmax), got "
                          f"{cfg.diffusion.softmax_sample}")
    if cfg.diffusion.softmax_sample > 0 and graph == "uniform":
        raise ConfigError(f"{where}: diffusion.softmax_sample works with diffusion.process = masked or with "
                          "score_entropy on the absorbing graph (a cross-entropy at masked positions); set it to 0 "
                          "for diffusion.graph = uniform")
    if not 0.0 < cfg.sampling.length_quantile <= 1.0:
        raise ConfigError(f"{where}: sampling.length_quantile must be in (0, 1], got {cfg.sampling.length_quantile}")
    if cfg.sampling.pad_tail is not None and cfg.sampling.pad_tail < 0:
        raise ConfigError(f"{where}: sampling.pad_tail must be >= 0 (visible PAD positions after the slots) or null "
                          f"(data.pad_slack + 4), got {cfg.sampling.pad_tail}")
    if cfg.sampling.shortlist < 0 or cfg.sampling.shortlist_frequent < 0:
        raise ConfigError(f"{where}: sampling.shortlist and sampling.shortlist_frequent must be >= 0 (shortlist 0 = "
                          f"off), got {cfg.sampling.shortlist} and {cfg.sampling.shortlist_frequent}")
    if cfg.sampling.shortlist > 0 and not cfg.model.bow_head:
        raise ConfigError(f"{where}: sampling.shortlist ranks ids with the bag-of-words head; this model has none "
                          "(model.bow_head: false): set sampling.shortlist: 0")
    if cfg.sampling.kv_refresh < 0:
        raise ConfigError(f"{where}: sampling.kv_refresh must be >= 0 (0 = off; r = a full pass every r steps), got "
                          f"{cfg.sampling.kv_refresh}")
    if cfg.sampling.guidance_refresh < 0:
        raise ConfigError(f"{where}: sampling.guidance_refresh must be >= 0 (0 = off; g = the null pass every g "
                          f"steps), got {cfg.sampling.guidance_refresh}")
    if cfg.sampling.refine < 0:
        raise ConfigError(f"{where}: sampling.refine must be >= 0 (rounds; 0 = off), got {cfg.sampling.refine}")
    if not 0.0 < cfg.sampling.refine_mask <= 1.0:
        raise ConfigError(f"{where}: sampling.refine_mask must be in (0, 1], got {cfg.sampling.refine_mask}")
    if not 0.0 <= d.substitute < 1.0:
        raise ConfigError(f"{where}: diffusion.substitute must be in [0, 1) (0 = off), got {d.substitute}")
    if d.substitute > 0 and d.process != "masked":
        raise ConfigError(f"{where}: diffusion.substitute works with diffusion.process = masked only; set it to 0 "
                          "for score_entropy")
    if d.substitute_weight < 0:
        raise ConfigError(f"{where}: diffusion.substitute_weight must be >= 0, got {d.substitute_weight}")
    if not 0.0 <= d.corrector < 1.0:
        raise ConfigError(f"{where}: diffusion.corrector must be in [0, 1) (the share of training rows; 0 = off), "
                          f"got {d.corrector}")
    if d.corrector > 0 and d.process != "masked":
        raise ConfigError(f"{where}: diffusion.corrector works with diffusion.process = masked only; set it to 0 "
                          "for score_entropy")
    if d.corrector_weight < 0:
        raise ConfigError(f"{where}: diffusion.corrector_weight must be >= 0, got {d.corrector_weight}")
    if cfg.sampling.correct < 0:
        raise ConfigError(f"{where}: sampling.correct must be >= 0 (rounds; 0 = off), got {cfg.sampling.correct}")
    if not 0.0 < cfg.sampling.correct_frac < 1.0:
        raise ConfigError(f"{where}: sampling.correct_frac must be in (0, 1), got {cfg.sampling.correct_frac}")
    if cfg.sampling.correct > 0 and cfg.sampling.sampler != "maskgit":
        raise ConfigError(f"{where}: sampling.correct is a MaskGIT step; set sampling.sampler: maskgit or "
                          "sampling.correct: 0")
    if cfg.sampling.repeat_penalty > 0 and graph == "uniform":
        raise ConfigError(f"{where}: sampling.repeat_penalty needs a distribution over clean tokens to penalise; the "
                          "uniform graph's output is a log-score (use diffusion.graph: absorbing or process: masked, "
                          "or sampling.repeat_penalty: 0)")
    if cfg.sampling.refine > 0 and graph == "uniform":
        raise ConfigError(f"{where}: sampling.refine needs a process with a [MASK] state; the uniform graph has "
                          "none (use diffusion.graph: absorbing or process: masked, or sampling.refine: 0)")
    if cfg.training.latent_pretrain_steps < 0:
        raise ConfigError(f"{where}: training.latent_pretrain_steps must be >= 0 (0 = off)")
    if cfg.training.heap_trim_every < 0:
        raise ConfigError(f"{where}: training.heap_trim_every must be >= 0 (steps between heap trims; 0 = never), "
                          f"got {cfg.training.heap_trim_every}")
    if cfg.training.latent_pretrain_steps > 0 and not cfg.model.bow_head:
        raise ConfigError(f"{where}: training.latent_pretrain_steps > 0 needs model.bow_head = true (it fits that head)")
    if len(cfg.training.betas) != 2:
        raise ConfigError(f"{where}: training.betas must be two numbers, e.g. [0.9, 0.98]; got {cfg.training.betas}")
    if not 0.0 <= cfg.model.self_condition_prob <= 1.0:
        raise ConfigError(f"{where}: model.self_condition_prob must be in [0, 1], got {cfg.model.self_condition_prob}")
    if cfg.model.self_condition and d.process != "masked":
        raise ConfigError(f"{where}: model.self_condition works with diffusion.process = masked only; set it to "
                          "false for score_entropy")
    if not 0.0 <= cfg.model.cond_dropout < 1.0:
        raise ConfigError(f"{where}: model.cond_dropout must be in [0, 1), got {cfg.model.cond_dropout}")
    if cfg.data.source in ("text", "disk") and not cfg.data.path:
        raise ConfigError(f"{where}: data.source = '{cfg.data.source}' needs data.path (a file, glob or folder)")
    if cfg.model.init_from == "scratch" and cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"{where}: model.hidden_size must be divisible by model.num_heads")
