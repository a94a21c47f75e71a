"""The training loop: data from the embedding cache, AdamW + warm-up/cosine LR, bf16 autocast, float32 EMA,
gradient clipping and accumulation, periodic validation through the real sampler, atomic checkpoints,
exact resume, SIGINT/SIGTERM handling, non-finite-loss guard, and DistributedDataParallel (gloo / nccl).

The diffusion process and the model are separate: `TrainStep` (the module DDP wraps) runs the VIB, hands
the decoder to `process.loss`, and adds the KL and length-head terms.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sgdd.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights_into,
    rotate_step_checkpoints,
    save_checkpoint,
)
from sgdd.cli import allocator_description, resident_mb, trim_heap
from sgdd.config import Config
from sgdd.generation import decode_sorted
from sgdd.precision import autocast, resolve_precision
from sgdd.tracking import Tracker

log = logging.getLogger("sgdd")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and what to try."""


# ---------------------------------------------------------------------------------------------------------
# small pure pieces


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` as progress goes 0 -> 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kl_weight_at(step: int, weight: float, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)


PRETRAINED_PARTS = ("decoder.tok_emb.", "decoder.pos_emb", "decoder.emb_norm.")
PRETRAINED_BLOCK_PARTS = (".attn.", ".mlp.", ".norm1.", ".norm2.")


def is_pretrained_param(name: str) -> bool:
    """Parameters that init_from: encoder copies from the frozen encoder (token and position embeddings, the
    embedding LayerNorm, the blocks' attention / MLP / LayerNorms); not the new AdaLN, conditioning and heads."""
    if name.startswith(PRETRAINED_PARTS):
        return True
    return name.startswith("decoder.blocks.") and any(part in name for part in PRETRAINED_BLOCK_PARTS)


def param_groups(
    module: nn.Module, weight_decay: float, pretrained_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups. No weight decay on biases, norms, scalars, embedding tables (token, position,
    bag-of-words: the tied output weights among them) and the null condition. With pretrained_lr_scale != 1
    the parameters copied from the encoder (is_pretrained_param) get their own groups; every group carries
    `lr_scale`, the factor the loop applies to the scheduled learning rate."""
    groups: dict[tuple[bool, float], list] = {}
    seen = set()
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 2)[-2:]  # e.g. ["tok_emb", "weight"] or ["decoder", "pos_emb"]
        decay = not (p.ndim < 2 or any(part.endswith(("_emb", "_pos", "_null")) for part in leaf))
        scale = pretrained_lr_scale if is_pretrained_param(name) else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in groups.items()]


class EMA:
    """Float32 shadow of the parameters (bf16 EMA never moves). decay warms up as min(d, (1+n)/(10+n))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in module.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in module.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p.detach().float() for p in module.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A full state dict of `module` (buffers included) with EMA parameter values."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        named = dict(zip(self.names, self.shadow, strict=True))
        for k in state:
            if k in named:
                state[k] = named[k].clone()
        return state

    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n].float())
        self.updates = updates


# ---------------------------------------------------------------------------------------------------------
# the bag-of-words term and the latent pre-training that fits it alone


def bow_loss(decoder, z: torch.Tensor, x0: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, float]:
    """Bag-of-words BCE per target token and the recall of the sentence's tokens among the top-|sentence|
    predictions. z (B, Dz); x0 (B, L) padded targets: the multi-hot target holds every id in the row (EOS
    included) except PAD."""
    B, V = x0.shape[0], decoder.vocab_size
    target = torch.zeros(B, V, device=x0.device)
    target.scatter_(1, x0, 1.0)
    target[:, pad_id] = 0.0
    counts = target.sum(1, keepdim=True)  # (B, 1) distinct tokens per sentence
    n_pos = counts.sum().clamp(min=1.0)
    logits = decoder.bow_logits(z).float()  # (B, V)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n_pos
    with torch.no_grad():
        k = int(counts.max().item())
        hit = target.gather(1, logits.topk(k, dim=1).indices)  # (B, k)
        recall = float((hit * (torch.arange(k, device=x0.device)[None, :] < counts)).sum() / n_pos)
    return loss, recall


def pretrain_latent(
    net, train_tokens, train_emb, pad_id: int, cfg: Config, device: torch.device, seed: int
) -> dict:
    """Fit the VIB, the bag-of-words head and the length head alone on the cached vectors for training.latent_pretrain_steps
    steps of latent_pretrain_batch sentences (AdamW, constant LR after a short warm-up, bf16 autocast, full KL
    weight). No transformer runs, so a step costs a small fraction of a decoder step: the "which words" part of
    the problem gets many more sentences than the decoder could see in the same time. Deterministic given the
    seed (every DDP rank computes the same result). Returns summary metrics."""
    from sgdd.data import make_batch

    tc = cfg.training
    dec = net.decoder
    head = getattr(net, "length_head", None)
    params = [*net.vib.parameters(), *dec.bow_mlp.parameters(), dec.bow_emb, dec.bow_bias]
    if head is not None:
        params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=tc.latent_pretrain_lr, betas=tuple(tc.betas), weight_decay=0.0)
    gen = np.random.default_rng(seed)
    N, B = len(train_tokens), min(tc.latent_pretrain_batch, len(train_tokens))
    warmup = max(1, tc.latent_pretrain_steps // 20)
    perm, pos = gen.permutation(N), 0
    t0 = time.monotonic()
    net.train()
    loss_f = recall = kl_f = float("nan")
    for step in range(tc.latent_pretrain_steps):
        if pos + B > N:
            perm, pos = gen.permutation(N), 0
        idx = np.sort(perm[pos : pos + B])
        pos += B
        x0 = make_batch([train_tokens[i] for i in idx], cfg.data.max_length).to(device)
        e = torch.as_tensor(train_emb[idx], dtype=torch.float32, device=device)
        for g in opt.param_groups:
            g["lr"] = tc.latent_pretrain_lr * min(1.0, (step + 1) / warmup)
        with autocast(tc.precision, device):
            z, kl = net.vib(e)
            loss, recall = bow_loss(dec, z, x0, pad_id)
            total = loss + cfg.model.kl_weight * kl.mean()
            if head is not None:  # as in TrainStep: the length head reads the detached posterior mean
                mu, _ = net.vib.posterior(e)
                total = total + F.cross_entropy(head(mu.detach().float()), (x0 != pad_id).sum(dim=1))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        opt.step()
        loss_f, kl_f = float(loss.detach()), float(kl.mean().detach())
        if (step + 1) % max(1, tc.latent_pretrain_steps // 10) == 0:
            log.info("latent pre-training %d/%d | bow_loss %.4f | bow_recall %.3f | kl %.1f | %.0f sent/s",
                     step + 1, tc.latent_pretrain_steps, loss_f, recall, kl_f,
                     (step + 1) * B / max(1e-9, time.monotonic() - t0))
    return {"pretrain/bow_loss": loss_f, "pretrain/bow_recall": recall, "pretrain/kl": kl_f,
            "pretrain/seconds": time.monotonic() - t0}


def ids_encoder(cfg: Config, vocab, device):
    """The frozen encoder, loaded once on `device`, as a function of decoder ids (sgdd.encoders.encode_ids)."""
    from sgdd.encoders import build_encoder, encode_ids

    encoder = build_encoder(cfg.encoder, device=device)
    return lambda ids: encode_ids(encoder, vocab, ids, cfg.encoder.batch_size)


# ---------------------------------------------------------------------------------------------------------
# the module DDP wraps


class TrainStep(nn.Module):
    """(x0, e, uncond) -> (total loss, metrics). Holds the network; receives the process (no parameters)."""

    def __init__(self, net: nn.Module, process, pad_id: int, bow_weight: float = 1.0):
        super().__init__()
        self.net = net
        self.process = process
        self.pad_id = pad_id
        self.bow_weight = bow_weight

    def forward(self, x0: torch.Tensor, e: torch.Tensor, uncond: torch.Tensor, kl_weight: float):
        z, kl = self.net.vib(e)  # (B, Dz), (B,)
        loss, metrics = self.process.loss(self.net.decoder, x0, z, uncond)
        kl_mean = kl.mean()
        total = loss + kl_weight * kl_mean
        metrics = dict(metrics)
        # the process's "loss" is the diffusion term alone; "loss" in the logs is the total optimised here
        metrics["diffusion_loss"] = metrics.pop("loss")
        metrics["kl"] = float(kl_mean.detach())
        dec = self.net.decoder
        if getattr(dec, "bow_mlp", None) is not None:
            bow, recall = bow_loss(dec, z, x0, self.pad_id)
            total = total + self.bow_weight * bow
            metrics["bow_loss"] = float(bow.detach())
            metrics["bow_recall"] = recall
        head = getattr(self.net, "length_head", None)
        if head is not None:
            target = (x0 != self.pad_id).sum(dim=1)  # (B,) tokens incl. EOS
            # the length head reads the posterior mean (what sampling feeds it), detached: it does not shape z
            mu, _ = self.net.vib.posterior(e)
            len_logits = head(mu.detach().float())
            len_loss = F.cross_entropy(len_logits, target)
            total = total + len_loss
            metrics["len_loss"] = float(len_loss.detach())
            metrics["len_acc"] = float((len_logits.argmax(-1) == target).float().mean())
        return total, metrics


# ---------------------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # setup_distributed created the process group (and train() ends it)
    # where the small control tensors of any_rank / agree_time / gather_objects live: CPU (gloo, or the CPU half of
    # the "cpu:gloo,cuda:nccl" group setup_distributed creates), the GPU for a group someone else made NCCL-only
    coll_device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    owns = not dist.is_initialized()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if owns:
        # NCCL only takes CUDA tensors: the loop's control flags and the RNG states go through gloo on the CPU
        dist.init_process_group(backend=process_group_backend(torch.cuda.is_available()))
    coll = f"cuda:{local}" if str(dist.get_backend()) == "nccl" else "cpu"
    return Dist(dist.get_rank(), dist.get_world_size(), local, owns, coll)


def process_group_backend(cuda: bool) -> str:
    """The backend setup_distributed asks for: gradients over NCCL and CPU tensors over gloo on GPUs, gloo on CPUs."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all-reduce)."""
    if d.world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.coll_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def agree_time(flag: bool, elapsed: float, d: Dist) -> tuple[bool, float]:
    """(any rank's flag, the largest elapsed time) on every rank, in one all-reduce: the ranks stop together and
    compute the same learning rate from the same time (DDP applies the same gradients on every rank, so the
    weights stay identical only if the learning rate is too)."""
    if d.world <= 1:
        return flag, elapsed
    t = torch.tensor([1.0 if flag else 0.0, elapsed], dtype=torch.float64, device=d.coll_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item() > 0), float(t[1].item())


def weights_checksum(net: nn.Module) -> float:
    """Sum of all parameters in float64: equal on ranks whose weights are equal (DDP keeps them bit-identical)."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() for p in net.parameters()))


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if d.world <= 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------------
# building


def build_net(cfg: Config, vocab_size: int, encoder_dim: int, encoder_ids: list[int] | None, pretrained=None):
    from sgdd.models import SGDDNet

    return SGDDNet(cfg, vocab_size, encoder_dim, pretrained=pretrained, encoder_ids=encoder_ids)


def load_pretrained_for_init(cfg: Config):
    """The frozen encoder's HF weights, only to initialise the decoder (init_from: encoder)."""
    if cfg.model.init_from != "encoder":
        return None
    from transformers import AutoModel

    from sgdd.encoders import resolve_model_path

    path = resolve_model_path(cfg.encoder.name)
    model = AutoModel.from_pretrained(str(path))
    model.eval()
    return model


def sync_model_sizes(cfg: Config, pretrained) -> Config:
    """With init_from: encoder the decoder's width, heads and MLP size are the encoder's: write them into the
    resolved config so a checkpoint rebuilds the same architecture without the encoder weights."""
    if pretrained is None:
        return cfg
    hf = pretrained.config
    model = dataclasses.replace(
        cfg.model,
        hidden_size=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        mlp_ratio=hf.intermediate_size / hf.hidden_size,
        num_layers=min(cfg.model.num_layers, hf.num_hidden_layers),
    )
    return dataclasses.replace(cfg, model=model)


# ---------------------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validation_loss(step_module: TrainStep, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: Config) -> dict:
    """Mean metrics over fixed validation batches with a fixed masking seed (comparable across evals)."""
    totals: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        for x0, e in batches:
            with autocast(cfg.training.precision, x0.device):
                _, metrics = step_module(x0, e, torch.zeros(x0.shape[0], dtype=torch.bool), 0.0)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
    return {f"val/{k}": v / max(1, len(batches)) for k, v in totals.items()}


@torch.no_grad()
def reconstruct(net, process, sampler, vocab, emb: torch.Tensor, cfg: Config, seed: int = 0) -> list[str]:
    """Greedy reconstructions of encoder vectors emb (N, De) with the posterior mean."""
    net.eval()
    gen = torch.Generator(device=emb.device).manual_seed(seed)
    z, _ = net.vib(emb)
    return decode_sorted(net, process, sampler, vocab, z, cfg, cfg.sampling.batch_size, generator=gen)


def bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


# ---------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_bleu: float
    last_metrics: dict
    # this call's main loop (latent pre-training and setup excluded; evaluations and saves in it included): sentences
    # trained on all ranks and wall-clock seconds, so sentences / seconds is the run's mean rate (last_metrics' rate
    # covers only the last log window)
    loop_sentences: int = 0
    loop_seconds: float = 0.0


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():  # masking draws on the batch's device
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))


def train(cfg: Config, log_losses: list | None = None) -> TrainResult:
    """Train per cfg. `log_losses`, when given, receives (step, loss) for every optimizer step (tests)."""
    from sgdd.data import LengthBucketSampler, batch_slack, make_batch
    from sgdd.diffusion import build_process
    from sgdd.embed_cache import prepare
    from sgdd.sampling import build_sampler

    d = setup_distributed()
    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.training.seed + d.rank)
    random.seed(cfg.training.seed + d.rank)

    # data: rank 0 builds the caches first, the others then load them
    if d.main:
        data = prepare(cfg)
    barrier(d)
    if not d.main:
        data = prepare(cfg)
    vocab = data.vocab

    run_dir = Path(cfg.training.output_dir) / cfg.training.run_name
    resume_path = _resume_path(cfg, run_dir)
    ckpt = load_checkpoint(resume_path, with_train_state=True) if resume_path else None

    pretrained = None if ckpt else load_pretrained_for_init(cfg)
    cfg = sync_model_sizes(cfg, pretrained)
    if ckpt:
        cfg = dataclasses.replace(cfg, model=ckpt.config.model)
    net = build_net(cfg, len(vocab), data.encoder_dim, vocab.encoder_ids, pretrained).to(device)
    del pretrained
    pretrain_metrics, pretrain_seconds = {}, 0.0
    if ckpt is None and cfg.training.latent_pretrain_steps > 0 and d.main:
        # rank 0 only: DistributedDataParallel hands its weights to the other ranks below, and the clocks agree
        # through agree_time, so the others wait instead of repeating the same work on the same cores
        pretrain_metrics = pretrain_latent(net, data.train_tokens, data.train_emb, vocab.PAD, cfg, device,
                                           seed=cfg.training.seed)
        pretrain_seconds = pretrain_metrics["pretrain/seconds"]
    process = build_process(cfg)
    process.set_token_counts(vocab.counts)  # sampled softmax columns, substitution draws (else a no-op)
    sampler = build_sampler(cfg, token_counts=vocab.counts)
    if cfg.diffusion.corrector > 0:  # the corrector rows re-embed their hypotheses with the frozen encoder, and so
        encode_ids = ids_encoder(cfg, vocab, device)  # do the in-training evaluations' correction rounds
        process.set_hypothesis_encoder(encode_ids)
        if hasattr(sampler, "hypothesis_fn"):
            sampler.hypothesis_fn = encode_ids
    step_module = TrainStep(net, process, vocab.PAD, cfg.model.bow_weight).to(device)
    ddp_module: nn.Module = step_module
    if d.world > 1:
        ddp_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[d.local_rank] if device.type == "cuda" else None
        )

    tc = cfg.training
    # fused AdamW: one kernel for all parameters instead of a Python loop over them
    lr_scale = tc.pretrained_lr_scale if cfg.model.init_from == "encoder" else 1.0
    optimizer = torch.optim.AdamW(param_groups(net, tc.weight_decay, lr_scale), lr=tc.lr, betas=tuple(tc.betas),
                                  eps=1e-8, fused=True)
    ema = EMA(net, tc.ema_decay)
    bucket = LengthBucketSampler(
        [len(t) for t in data.train_tokens],
        batch_size=tc.batch_size,
        seed=tc.seed,
        bucket=cfg.data.bucket_by_length,
        rank=d.rank,
        world_size=d.world,
    )
    step, elapsed_before, best_bleu = 0, pretrain_seconds, -1.0  # the pre-training counts towards max_minutes
    if ckpt is not None:
        load_weights_into(net, ckpt.model_state, str(ckpt.path))
        ts = ckpt.train_state
        optimizer.load_state_dict(ts["optimizer"])
        ema.load(ckpt.ema_state, ts["ema_updates"])
        bucket.load_state_dict(ts["sampler"])
        saved_world = int(ts["sampler"].get("world_size", d.world))
        if saved_world != d.world and d.main:
            log.warning("resuming a run saved with %d processes on %d: the global batch is now %d sentences (was %d); "
                        "the data goes on from the same place in the epoch", saved_world, d.world,
                        tc.batch_size * tc.grad_accum * d.world, tc.batch_size * tc.grad_accum * saved_world)
        step, elapsed_before, best_bleu = ts["step"], ts["elapsed"], ts["best_bleu"]
        if saved_world == d.world and d.world > 1 and "rng_ranks" in ts:
            _set_rng_state(ts["rng_ranks"][d.rank])
        elif "rng" in ts and d.world == 1:
            _set_rng_state(ts["rng"])  # rank 0's (a run saved on several processes: their RNG streams differ)
        elif d.main:
            log.warning("the random streams start afresh (the checkpoint holds none for %d processes): the run does "
                        "not repeat bit for bit what an uninterrupted one would have drawn", d.world)
        if d.main:
            log.info("resumed from %s at step %d", ckpt.path, step)

    n_params = sum(p.numel() for p in net.parameters())
    if d.main:
        log.info("model: %.1fM parameters, vocabulary %d, encoder dim %d, %d training sentences",
                 n_params / 1e6, len(vocab), data.encoder_dim, len(data.train_tokens))
        log.info("precision: %s (training.precision = %s)", resolve_precision(tc.precision, device), tc.precision)
        log.info("heap allocator: %s", allocator_description())
    tracker = Tracker(cfg, enabled=d.main)
    if pretrain_metrics:
        tracker.log(pretrain_metrics, 0)

    # fixed validation material
    val_batches = []
    for i in range(0, min(len(data.valid_tokens), tc.num_eval_batches * tc.batch_size), tc.batch_size):
        toks = data.valid_tokens[i : i + tc.batch_size]
        val_batches.append((make_batch(toks, cfg.data.max_length, cfg.data.pad_slack // 2).to(device),
                            torch.tensor(np.asarray(data.valid_emb[i : i + len(toks)]), dtype=torch.float32, device=device)))
    n_rec = min(tc.num_eval_sentences, len(data.valid_sentences))
    rec_refs = [vocab.decode(vocab.encode(s)) for s in data.valid_sentences[:n_rec]]  # tokenizer round trip
    rec_emb = torch.tensor(np.asarray(data.valid_emb[:n_rec]), dtype=torch.float32, device=device)
    eval_net = copy.deepcopy(net).eval()

    stop = {"signal": None}

    def _on_signal(signum, frame):
        stop["signal"] = signum

    # every rank records the signal (torchrun forwards SIGTERM to all of them); the ranks agree to stop through
    # any_rank at the top of the next step, and rank 0 saves latest/
    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def save(kind: str, metrics: dict | None = None) -> None:
        def weights(meta_kind: str) -> dict:
            meta = {"step": step, "kind": meta_kind, "metrics": metrics or {}, "run_name": tc.run_name}
            return dict(config=cfg, model_state=net.state_dict(), ema_state=ema.state_dict(net),
                        vocab_file=data.vocab_path, meta=meta)

        if kind == "best":  # rank 0 alone (from evaluate_now), no training state
            save_checkpoint(run_dir / "best", **weights(kind))
            return
        # "step" and "final": every rank calls save; one gather brings each rank's RNG and weight checksum to all
        ranks = gather_objects((_rng_state(), weights_checksum(net) if d.world > 1 else 0.0), d)
        sums = [checksum for _, checksum in ranks]
        if d.main and len(set(sums)) > 1:
            log.warning("step %d: the ranks' weights differ (checksums %s); DistributedDataParallel keeps them "
                        "identical, so something rank-specific changed them: please report this", step, sums)
        if not d.main:
            return
        state = {
            "optimizer": optimizer.state_dict(),
            "ema_updates": ema.updates,
            "sampler": bucket.state_dict(),
            "step": step,
            "elapsed": elapsed_before + (time.monotonic() - t_start),
            "best_bleu": best_bleu,
            "rng": ranks[0][0],  # rank 0's (this process's)
        }
        if d.world > 1:
            state["rng_ranks"] = [rng for rng, _ in ranks]
        kwargs = weights(kind)
        save_checkpoint(run_dir / "latest", train_state=state, **kwargs)
        if kind == "step" and tc.keep_last > 0:
            save_checkpoint(run_dir / f"step-{step:07d}", train_state=state, **kwargs)
            rotate_step_checkpoints(run_dir, tc.keep_last)

    def evaluate_now() -> dict:
        nonlocal best_bleu
        eval_net.load_state_dict(ema.state_dict(net))
        eval_net.eval()
        eval_step = TrainStep(eval_net, process, vocab.PAD, cfg.model.bow_weight)
        metrics = validation_loss(eval_step, val_batches, cfg)
        t0 = time.monotonic()
        hyps = reconstruct(eval_net, process, sampler, vocab, rec_emb, cfg)
        metrics["val/gen_sentences_per_s"] = len(hyps) / max(1e-9, time.monotonic() - t0)
        metrics["val/bleu"] = bleu(hyps, rec_refs)
        metrics["val/exact"] = sum(h == r for h, r in zip(hyps, rec_refs, strict=True)) / max(1, len(hyps))
        log.info("eval step %d | %s", step, " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()))
        for src, hyp in list(zip(rec_refs, hyps, strict=True))[:3]:
            log.info("  in : %s\n  out: %s", src, hyp)
        if metrics["val/bleu"] > best_bleu:
            best_bleu = metrics["val/bleu"]
            metrics["val/best_bleu"] = best_bleu
            save("best", metrics)
        return metrics

    budget_s = tc.max_minutes * 60.0
    t_start = time.monotonic()
    nonfinite = 0
    last_metrics: dict = {}
    window_sent, window_tok, window_t = 0, 0, time.monotonic()
    # the log line and the tracker report means over the steps since the last log line: batches are length
    # buckets, so one step's loss swings with its sentences' length (a trained fiction model, 256-row batches of
    # valid.txt: loss 3.5 at 5-10 tokens, 10.0 at 36-63; bench/RESULTS.md "Thirty-eighth round")
    window_steps, window_loss, window_metrics = 0, 0.0, {}
    loop_sentences = 0
    batches = _forever(bucket)
    net.train()
    try:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, disable=not (d.main and sys.stderr.isatty()),
                   dynamic_ncols=True, desc="train")
        while True:
            elapsed = elapsed_before + (time.monotonic() - t_start)
            halt, elapsed = agree_time(step >= tc.max_steps or stop["signal"] is not None, elapsed, d)
            if halt or (budget_s > 0 and elapsed >= budget_s):
                break
            progress = max(step / tc.max_steps, elapsed / budget_s if budget_s > 0 else 0.0)
            lr = tc.lr * lr_factor(step, progress, tc.warmup_steps, tc.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            klw = kl_weight_at(step, cfg.model.kl_weight, cfg.model.kl_warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_metrics, ok = 0.0, {}, True
            for micro in range(tc.grad_accum):
                idx = next(batches)
                rows = [data.train_tokens[i] for i in idx]
                # python RNG: seeded and saved with the checkpoint
                slack = batch_slack(max(len(r) for r in rows), cfg.data.max_length, cfg.data.pad_slack,
                                    cfg.data.pad_multiple, random)
                x0 = make_batch(rows, cfg.data.max_length, slack).to(device)
                e = torch.as_tensor(data.train_emb[idx], dtype=torch.float32, device=device)  # (B, De)
                uncond = torch.rand(x0.shape[0]) < cfg.model.cond_dropout
                last_micro = micro == tc.grad_accum - 1
                sync_ctx = ddp_module.no_sync() if (d.world > 1 and not last_micro) else contextlib.nullcontext()
                with sync_ctx:
                    with autocast(tc.precision, device):
                        loss, metrics = ddp_module(x0, e, uncond.to(device), klw)
                    # backward even on a non-finite loss so every DDP rank joins the same all-reduce
                    (loss / tc.grad_accum).backward()
                ok = ok and bool(torch.isfinite(loss))
                step_loss += float(loss.detach()) / tc.grad_accum
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / tc.grad_accum
                window_sent += x0.shape[0]
                window_tok += x0.numel()
                loop_sentences += x0.shape[0] * d.world
            clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            ok = not any_rank(not (ok and bool(torch.isfinite(gnorm))), d)
            if not ok:
                nonfinite += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, nonfinite)
                if nonfinite >= tc.max_nonfinite:
                    raise TrainingError(
                        f"the loss was non-finite for {nonfinite} steps in a row (step {step}); lower training.lr "
                        f"(now {tc.lr}) or set training.precision=fp32; the last good checkpoint is in {run_dir}/latest"
                    )
                continue
            nonfinite = 0
            optimizer.step()
            ema.update(net)
            step += 1
            if log_losses is not None:
                log_losses.append((step, step_loss))
            window_steps += 1
            window_loss += step_loss
            for k, v in step_metrics.items():
                window_metrics[k] = window_metrics.get(k, 0.0) + v
            bar.update(1)

            if tc.heap_trim_every > 0 and step % tc.heap_trim_every == 0:
                trim_heap()  # every rank: its own heap (sgdd.cli.trim_heap)
            at_log = step % tc.log_every == 0 or step == 1
            if d.main and at_log:
                now = time.monotonic()
                dt = max(1e-9, now - window_t)
                mean_loss = window_loss / window_steps
                mean_metrics = {k: v / window_steps for k, v in window_metrics.items()}
                last_metrics = {"train/loss": mean_loss, "train/lr": lr, "train/kl_weight": klw,
                                "train/grad_norm": float(gnorm),
                                "train/sentences_per_s": window_sent * d.world / dt,
                                "train/tokens_per_s": window_tok * d.world / dt,
                                **{f"train/{k}": v for k, v in mean_metrics.items()}}
                rss = resident_mb()
                if rss is not None:
                    last_metrics["train/rss_mb"] = rss
                window_t = now
                elapsed = elapsed_before + (now - t_start)
                remaining = _eta(step, tc.max_steps, elapsed, budget_s)
                line = (f"step {step} | loss {mean_loss:.4f} | acc {mean_metrics.get('acc', float('nan')):.3f} | "
                        f"kl {mean_metrics.get('kl', 0.0):.2f} | bow_rec {mean_metrics.get('bow_recall', float('nan')):.3f} | "
                        f"len_acc {mean_metrics.get('len_acc', float('nan')):.3f} | "
                        + (f"hyp_acc {mean_metrics['hyp_acc']:.3f} | corr_ce {mean_metrics['corrector_ce']:.3f} | "
                           if "hyp_acc" in mean_metrics else "")
                        + f"lr {lr:.2e} | "
                        f"{last_metrics['train/sentences_per_s']:.1f} sent/s | "
                        f"{last_metrics['train/tokens_per_s']:.0f} tok/s | "
                        + (f"rss {rss / 1024:.1f} GB | " if rss is not None else "")
                        + f"eta {remaining}")
                bar.set_postfix_str(f"loss {step_loss:.3f} {last_metrics['train/sentences_per_s']:.0f} sent/s")
                if sys.stderr.isatty():
                    bar.write(line)
                else:
                    log.info(line)
                tracker.log(last_metrics, step)
            if at_log:  # every rank: only the main one reports, the others' sums would grow without bound
                window_steps, window_loss, window_metrics = 0, 0.0, {}
                window_sent, window_tok = 0, 0

            if tc.eval_every > 0 and step % tc.eval_every == 0:
                if d.main:
                    metrics = evaluate_now()
                    tracker.log(metrics, step)
                    net.train()
                barrier(d)
            if tc.save_every > 0 and step % tc.save_every == 0:
                save("step")
                barrier(d)
        bar.close()
        loop_seconds = time.monotonic() - t_start
        if stop["signal"] is not None and d.main:
            log.warning("received signal %d: saving %s/latest and stopping", stop["signal"], run_dir)
        if d.main and tc.eval_every > 0 and step % tc.eval_every != 0 and stop["signal"] is None:
            tracker.log(evaluate_now(), step)
        save("final")
        barrier(d)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    tracker.summary({"best_bleu": best_bleu, "step": step})
    tracker.finish()
    if d.owns_group:
        dist.destroy_process_group()
    return TrainResult(run_dir, step, best_bleu, last_metrics, loop_sentences, loop_seconds)


def _forever(bucket):
    """Endless index batches: epoch after epoch (the sampler's own state says where we are)."""
    while True:
        yield from bucket


def _eta(step: int, max_steps: int, elapsed: float, budget_s: float) -> str:
    if step == 0:
        return "?"
    by_steps = (max_steps - step) * elapsed / step
    left = min(by_steps, budget_s - elapsed) if budget_s > 0 else by_steps
    left = max(0.0, left)
    return f"{int(left // 60)}m{int(left % 60):02d}s"


def _resume_path(cfg: Config, run_dir: Path) -> Path | None:
    r = cfg.training.resume
    if not r:
        return None
    if r == "auto":
        latest = run_dir / "latest"
        old = run_dir / "latest.old"
        return latest if (latest.exists() or old.exists()) else None
    p = Path(r)
    if not p.exists():
        raise CheckpointError(f"training.resume = '{r}': no such checkpoint folder")
    return p


def train_and_report(cfg: Config) -> TrainResult:
    """train(), then (main process, training.final_eval) evaluate the best checkpoint on held-out sentences
    through the sampler and print BLEU, chrF, exact match and a few input -> reconstruction pairs."""
    result = train(cfg)
    if not cfg.training.final_eval or cfg.training.final_eval_sentences == 0 or int(os.environ.get("RANK", "0")) != 0:
        return result
    from sgdd.api import SGDD
    from sgdd.data import load_corpus
    from sgdd.evaluation import evaluate_reconstruction, print_report

    best = result.run_dir / "best"
    ckpt_dir = best if best.exists() else result.run_dir / "latest"
    model = SGDD.from_pretrained(ckpt_dir)
    # the whole config: held-out sentences measured with the run's own encoder tokenizer, train set not reloaded
    valid = load_corpus(model.cfg, valid_only=True).valid[: cfg.training.final_eval_sentences]
    report = evaluate_reconstruction(model, valid)
    print_report(report)
    log.info("checkpoint: %s", ckpt_dir)
    return result
