"""A separate corrector, trained after the base model on the base model's own drafts (plan.md: what was left of
the trained-corrector idea after round 24). A research probe, not a shipped feature.

    uv run python bench/corrector_probe.py --checkpoint checkpoints/fiction_minilm/latest --minutes 25

1. Drafts: the base checkpoint decodes --num-train training sentences and the first --num-valid lines of the
   validation file with its config's decoding; the frozen encoder re-embeds every draft (e_hyp). Cached in
   --out/drafts.pt (reused when present and made for the same inputs).
2. The corrector: a copy of the base decoder (same weights, same z from the VIB posterior) that also sees
   - the draft's tokens, as a second segment in front of the sequence (the same token and position embeddings +
     a learned segment vector; every position attends to it; dropped from the output), and
   - the draft's re-embedded vector, z + W e_hyp (W zero-initialised).
   It trains for --minutes with the base's own loss (process.loss: masked diffusion, ELBO weights, sampled
   softmax) on (sentence, its draft) pairs; the VIB, length head and bag-of-words head stay frozen.
3. Evaluation on the validation lines, BLEU against the round trip (as bench/quality.py): the base's drafts; the
   base decoded without key / value reuse (the corrector decodes without it); the corrector on the real drafts,
   on drafts of other sentences (does it read them?), on an empty draft, and a second correction round.

The sampler and loss see the corrector through the decoder interface: the draft and e_hyp travel packed behind z
as extra columns (z | e_hyp | draft ids as floats), so every row subset the sampler takes carries its own draft.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import read_lines  # noqa: E402
from torch import nn  # noqa: E402

from sgdd.data import Vocab, load_corpus, make_batch  # noqa: E402
from sgdd.models.decoder import Decoder  # noqa: E402

PAD_ID, EOS_ID = Vocab.PAD, Vocab.EOS


class DraftDecoder(Decoder):
    """A loaded Decoder whose class is swapped (convert): z arrives packed as (z | e_hyp | draft ids)."""

    supports_kv = False  # the draft segment is not in the key / value path
    share_null_rows = False

    @classmethod
    def convert(cls, dec: Decoder, encoder_dim: int) -> DraftDecoder:
        if dec.num_prefix or dec.num_cross or dec.rope_cos is not None or dec.z_pos is not None or dec.self_condition:
            raise SystemExit("corrector_probe handles learned positions, no prefix / cross tokens / z_positions / "
                             "self-conditioning (the fiction config)")
        dec.__class__ = cls
        D = dec.arch.dim
        dev = dec.tok_emb.weight.device
        dec.draft_seg = nn.Parameter(torch.randn(D, device=dev) * 0.02)
        dec.draft_hyp = nn.Linear(encoder_dim, dec.latent_dim).to(dev)
        nn.init.zeros_(dec.draft_hyp.weight)
        nn.init.zeros_(dec.draft_hyp.bias)
        return dec

    def split(self, zp: torch.Tensor):
        Dz, De = self.latent_dim, self.draft_hyp.in_features
        z, e_hyp, d = zp[:, :Dz], zp[:, Dz : Dz + De], zp[:, Dz + De :].round().long()
        keep = int((d != PAD_ID).any(0).nonzero().max()) + 1 if bool((d != PAD_ID).any()) else 1
        return z, e_hyp, d[:, :keep]

    def latent(self, z: torch.Tensor, e_hyp: torch.Tensor) -> torch.Tensor:
        """The corrector's condition z + W e_hyp."""
        return z + self.draft_hyp(e_hyp.to(self.draft_hyp.weight.dtype)).to(z.dtype)

    def bow_logits(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] > self.latent_dim:  # the sampler's shortlist call passes the packed latent
            z = self.latent(*self.split(z)[:2])
        return super().bow_logits(z)

    def _hidden(self, x_t, t, zp, uncond=None, sc=None, widths=None):
        z, e_hyp, d = self.split(zp)
        z = self.latent(z, e_hyp)
        B, L = x_t.shape
        Ld = d.shape[1]
        c, z = self._condition_rows(x_t, t, z, uncond)
        hx = self.tok_emb(x_t) + self.pos_emb[:L]
        hd = self.tok_emb(d) + self.pos_emb[:Ld] + self.draft_seg
        h = self.emb_drop(self.emb_norm(torch.cat([hd, hx], dim=1)))
        key_mask = None
        if widths is not None:
            widths = widths.to(device=x_t.device, dtype=torch.long)
            key_mask = torch.cat([torch.ones(B, Ld, dtype=torch.bool, device=x_t.device),
                                  torch.arange(L, device=x_t.device)[None, :] < widths[:, None]], dim=1)
        for block in self.blocks:
            h = block(h, c, None, key_mask, None)
        return h[:, Ld:], c, z


def pack(z: torch.Tensor, e_hyp: torch.Tensor, drafts: list[list[int]], width: int) -> torch.Tensor:
    d = torch.full((len(drafts), width), float(PAD_ID))
    for i, r in enumerate(drafts):
        r = list(r[: width - 1]) + [EOS_ID]
        d[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return torch.cat([z.float().cpu(), e_hyp.float().cpu(), d], dim=1)


def encode_texts(model, texts: list[str]) -> torch.Tensor:
    # a draft can be empty (the sampler wrote only EOS / PAD); SGDD.encode refuses empty inputs, so "." stands in
    return model.encode([t if t.strip() else "." for t in texts]).float().cpu()


def main() -> None:
    from sgdd.cli import preload_allocator

    # tcmalloc where installed, as quality.py: under glibc's malloc this loop's resident size grew ~0.6 GB a minute
    preload_allocator(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--train-text", default="../shared/data/eltec_eng/train.txt")
    ap.add_argument("--valid-text", default="../shared/data/eltec_eng/valid.txt")
    ap.add_argument("--num-train", type=int, default=40000)
    ap.add_argument("--num-valid", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-draft", action="store_true",
                    help="the control: train the same way with empty drafts and e_hyp = 0 (more training of the "
                         "base decoder, in the corrector's code path)")
    ap.add_argument("--out", default="bench/out/corrector_probe")
    args = ap.parse_args()

    from sgdd.api import SGDD
    from sgdd.evaluation import reconstruction_metrics, reference_roundtrip
    from sgdd.generation import choose_lengths, decode_sorted
    from sgdd.precision import autocast
    from sgdd.sampling import build_sampler

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SGDD.from_pretrained(args.checkpoint, device="cpu")
    cfg, net, vocab, process = model.cfg, model.net, model.vocab, model.process
    process.set_token_counts(vocab.counts)
    L = cfg.data.max_length
    results: dict = {"checkpoint": args.checkpoint, "args": vars(args)}

    # 1. drafts -------------------------------------------------------------------------------------------
    # training lines: a seeded sample of the base's own training set (sgdd.data.load_corpus on --train-text with
    # the checkpoint's data settings). Round 45 (commit 56360a3 and before) sampled the file's first
    # data.max_sentences non-empty lines instead, of which about 40 % were in the training set
    valid = read_lines(args.valid_text, args.num_valid)
    cache = out / "drafts.pt"
    key = {"checkpoint": str(Path(args.checkpoint).resolve()), "num_train": args.num_train,
           "num_valid": args.num_valid, "train": args.train_text, "valid": args.valid_text, "pool": "load_corpus"}
    D = torch.load(cache) if cache.exists() else None
    if D is not None and D.get("key") == key:
        print(f"drafts from {cache}")
    else:
        data_cfg = dataclasses.replace(cfg.data, source="text", path=args.train_text, valid_path=args.valid_text)
        lines = load_corpus(dataclasses.replace(cfg, data=data_cfg), tokenizer=vocab.tokenizer).train
        if len(lines) < args.num_train:
            raise SystemExit(f"the training set made from --train-text has {len(lines)} sentences (data.max_sentences "
                             f"{cfg.data.max_sentences}), fewer than --num-train {args.num_train}; lower --num-train")
        train = random.Random(1234).sample(lines, args.num_train)
        D = {"key": key, "train": train, "valid": valid}
        for name, texts in (("valid", valid), ("train", train)):
            t0 = time.time()
            e = encode_texts(model, texts)
            with torch.no_grad():
                mu = net.vib.posterior(e)[0].float()
            hyps = model._decode(mu, cfg, seed=0)
            dt = time.time() - t0
            e_hyp = encode_texts(model, hyps)
            D[name + "_e"], D[name + "_mu"], D[name + "_hyp"], D[name + "_ehyp"] = e, mu, hyps, e_hyp
            print(f"drafts {name}: {len(texts)} in {dt:.0f} s ({len(texts) / dt:.1f} sentences/s)", flush=True)
        torch.save(D, cache)

    refs = reference_roundtrip(valid, vocab)

    def score(hyps: list[str]) -> dict:
        m = reconstruction_metrics(hyps, valid, roundtrip_refs=refs)
        return {k: round(m[k], 2) for k in ("bleu_roundtrip", "bleu", "token_f1_roundtrip", "length_ratio")}

    results["base"] = score(D["valid_hyp"])
    print("base (config decoding):", results["base"], flush=True)
    exact_cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, kv_refresh=0))
    lengths_v = choose_lengths(net, D["valid_mu"], cfg)

    def decode(decoder_net, zp, c, seed=0):
        sampler = build_sampler(c, token_counts=vocab.counts)
        gen = torch.Generator().manual_seed(seed)
        return decode_sorted(decoder_net, process, sampler, vocab, zp, c, c.sampling.batch_size, generator=gen,
                             lengths=lengths_v)

    t0 = time.time()
    base_exact = decode(net, D["valid_mu"], exact_cfg)
    results["base_exact"] = score(base_exact)
    results["base_exact_seconds"] = round(time.time() - t0, 1)
    print("base without key / value reuse:", results["base_exact"], flush=True)

    # 2. the corrector ------------------------------------------------------------------------------------
    corr = copy.deepcopy(net)
    DraftDecoder.convert(corr.decoder, D["train_e"].shape[1])
    for p in corr.parameters():
        p.requires_grad_(False)
    params = [p for n, p in corr.decoder.named_parameters() if not n.startswith("bow_")]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)

    tr_ids = [vocab.encode(t)[: L - 1] for t in D["train"]]
    tr_draft = [[] if args.no_draft else vocab.encode(t) for t in D["train_hyp"]]
    tr_ehyp = torch.zeros_like(D["train_ehyp"]) if args.no_draft else D["train_ehyp"]
    order = sorted(range(len(tr_ids)), key=lambda i: len(tr_ids[i]))
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size]
    rng = random.Random(args.seed)
    corr.decoder.train()
    budget = args.minutes * 60.0
    start = time.time()
    step, seen, log = 0, 0, []
    while time.time() - start < budget:
        rng.shuffle(batches)
        for b in batches:
            frac = (time.time() - start) / budget
            if frac >= 1.0:
                break
            lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            x0 = make_batch([tr_ids[i] for i in b], L, rng.randint(0, cfg.data.pad_slack))
            mu = D["train_mu"][b]
            with torch.no_grad():
                _, logvar = net.vib.posterior(D["train_e"][b])
            z = mu + torch.randn_like(mu) * (0.5 * logvar.float()).exp()  # as the base trained: z ~ q(z | e)
            zp = pack(z, tr_ehyp[b], [tr_draft[i] for i in b], L)
            with autocast(cfg.training.precision, "cpu"):
                loss, metrics = process.loss(corr.decoder, x0, zp, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                for e_p, p in zip(ema, params, strict=True):
                    e_p.lerp_(p.detach(), 1.0 - args.ema)
            step += 1
            seen += len(b)
            if step % 25 == 0:
                el = time.time() - start
                log.append({"step": step, "seconds": round(el), **{k: round(v, 4) for k, v in metrics.items()}})
                print(f"step {step} | {el:.0f} s | loss {metrics['loss']:.4f} | acc {metrics['acc']:.3f} | "
                      f"{seen / el:.0f} sentences/s | lr {lr:.2e}", flush=True)
    results["train"] = {"steps": step, "sentences": seen, "seconds": round(time.time() - start),
                        "epochs": round(seen / len(tr_ids), 2), "log": log}
    corr.decoder.eval()
    with torch.no_grad():
        for e_p, p in zip(ema, params, strict=True):
            p.copy_(e_p)

    # 3. evaluation ---------------------------------------------------------------------------------------
    v_draft = [vocab.encode(t) for t in D["valid_hyp"]]
    perm = list(range(len(valid)))
    random.Random(7).shuffle(perm)
    arms = {
        "corrector": pack(D["valid_mu"], D["valid_ehyp"], v_draft, L),
        "corrector_other_drafts": pack(D["valid_mu"], D["valid_ehyp"][perm], [v_draft[i] for i in perm], L),
        "corrector_empty_draft": pack(D["valid_mu"], torch.zeros_like(D["valid_ehyp"]), [[]] * len(valid), L),
    }
    outputs = {}
    for name, zp in arms.items():
        t0 = time.time()
        outputs[name] = decode(corr, zp, exact_cfg)
        results[name] = score(outputs[name])
        results[name + "_seconds"] = round(time.time() - t0, 1)
        print(name, results[name], flush=True)
    second = outputs["corrector"]
    zp2 = pack(D["valid_mu"], encode_texts(model, second), [vocab.encode(t) for t in second], L)
    outputs["corrector_round2"] = decode(corr, zp2, exact_cfg)
    results["corrector_round2"] = score(outputs["corrector_round2"])
    print("corrector_round2", results["corrector_round2"], flush=True)
    results["examples"] = [{"input": valid[i], "draft": D["valid_hyp"][i], "corrected": outputs["corrector"][i]}
                           for i in range(0, len(valid), max(1, len(valid) // 8))]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("train", "examples", "args")}, indent=1))


if __name__ == "__main__":
    main()
