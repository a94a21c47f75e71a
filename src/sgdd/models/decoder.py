"""The conditioned denoiser: (x_t, t, z) -> logits of the clean tokens.

    c = MLP(timestep_embedding(t)) + MLP(z')                     (B, D)   z' = z_null where uncond
    h = LN_emb(tok_emb[x_t] + pos_emb[:L] (+ W_l z' at [MASK]s))  (B, L, D)  (+ P prefix tokens from z')
    h = block_k(h, c, rope) for each block                       AdaLN-Zero modulated by c
    logits = FinalLayer(h, c)[select]                            (B, L, V) or (N, V)

Two initialisations (cfg.init_from):
- "scratch": DiT blocks of cfg.hidden_size / num_heads / mlp_ratio.
- "encoder": the frozen encoder's own transformer (BERT / XLM-R layout): its token embeddings (rows picked by
  the decoder vocabulary's encoder_ids), absolute positions, embedding LayerNorm and first num_layers layers,
  as PretrainedBlocks. With the modulation zeroed (as at init) and positions == "learned", the hidden states
  before the final layer are exactly the encoder's hidden states for the same token ids. `pretrained` may be
  the transformers model (weights copied), its config (architecture only) or None (architecture from the
  cfg sizes, BERT defaults for LayerNorm eps and activation) when a checkpoint will supply the weights.

Positions: "learned" (absolute table), "rope" (rotary on q/k), or "both"; an all-[MASK] input still gives
different outputs at different positions. Logits are computed only at `select`ed positions when given: with
a 20-30k vocabulary the output product is most of the compute; a `shortlist` (shared ids + per-row ids)
shrinks it further at sampling time. `sc` (model.self_condition) feeds the previous step's output features back
into the [MASK] inputs. Raw logits, no knowledge of schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sgdd.config import ModelConfig
from sgdd.models.layers import (
    DiTBlock,
    FinalLayer,
    PackedPositions,
    PretrainedBlock,
    rope_tables,
    timestep_embedding,
)
from sgdd.registry import ConfigError

FREQ_DIM = 256  # sinusoidal timestep features before the MLP
PAD_ID, MASK_ID = 0, 1  # decoder vocabulary contract (sgdd.data.Vocab)


@dataclass(frozen=True)
class Arch:
    """Sizes of the transformer stack (from the config, or from the pretrained model's config)."""

    kind: str  # "dit" | "pretrained"
    dim: int
    num_heads: int
    mlp_hidden: int
    eps: float = 1e-12
    act: str = "gelu"


def _is_hf_model(obj) -> bool:
    return hasattr(getattr(obj, "base_model", obj), "embeddings")


def resolve_arch(cfg: ModelConfig, pretrained=None) -> Arch:
    if cfg.init_from == "scratch":
        return Arch("dit", cfg.hidden_size, cfg.num_heads, int(round(cfg.hidden_size * cfg.mlp_ratio)))
    if pretrained is None:  # weights come from a checkpoint; sizes were written into cfg at training time
        return Arch("pretrained", cfg.hidden_size, cfg.num_heads, int(round(cfg.hidden_size * cfg.mlp_ratio)))
    hf = pretrained.config if _is_hf_model(pretrained) else pretrained
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"model.init_from=encoder: position_embedding_type '{hf.position_embedding_type}' is not supported "
            "(BERT / XLM-R absolute positions only); use model.init_from=scratch"
        )
    if cfg.num_layers > hf.num_hidden_layers:
        raise ConfigError(
            f"model.num_layers = {cfg.num_layers} but the encoder has only {hf.num_hidden_layers} layers"
        )
    return Arch(
        "pretrained",
        hf.hidden_size,
        hf.num_attention_heads,
        hf.intermediate_size,
        float(hf.layer_norm_eps),
        hf.hidden_act if isinstance(hf.hidden_act, str) else "gelu",
    )


@dataclass
class KVState:
    """Keys / values reused across decoding steps (Decoder.forward(kv=...)): `cache` holds each block's (keys,
    values) (B, H, L, hd) for x_t's rows, None before the first (full) pass; `positions` (B, r) long are the
    positions to run at the next call (repeats allowed), None = all; `valid` (B, r) bool, optional, marks the
    entries of `positions` to run (the rest are padding, never run; None = all). The positions run are packed:
    their projections and MLPs cost what they hold, not B x r. forward replaces `cache` with the new one, written
    into the given tensors when `writable` (the caller owns them: no copy of the whole cache per call)."""

    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    writable: bool = False


@dataclass
class Shortlist:
    """Shortlist decoding's ids, shared (F,) and per row (B, K), with the output table's rows at them gathered once
    per decode (Decoder.prepare_shortlist) instead of at every step: w_shared (F, D), w_own (B, K, D) in the
    compute dtype (autocast's, when it is on), b_shared (F,), b_own (B, K) as stored. With a bag-of-words head,
    `prior` holds its table's rows, biases and `bow_seen` shifts at the same ids (PriorRows), so the prior is
    computed at the F + K columns only. Indexes like the (shared, per_row) pair it replaces."""

    shared: torch.Tensor
    per_row: torch.Tensor
    w_shared: torch.Tensor
    b_shared: torch.Tensor
    w_own: torch.Tensor
    b_own: torch.Tensor
    prior: PriorRows | None = None

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.shared, self.per_row)[i]

    def rows(self, idx) -> Shortlist:
        """The shortlist of rows `idx` (a slice or an index tensor)."""
        return Shortlist(self.shared, self.per_row[idx], self.w_shared, self.b_shared, self.w_own[idx],
                         self.b_own[idx], None if self.prior is None else self.prior.rows(idx))

    def twice(self) -> Shortlist:
        """The rows stacked on themselves (the guidance wrapper's null rows use their conditional row's ids)."""
        return Shortlist(self.shared, torch.cat([self.per_row] * 2), self.w_shared, self.b_shared,
                         torch.cat([self.w_own] * 2), torch.cat([self.b_own] * 2),
                         None if self.prior is None else self.prior.twice())


@dataclass
class PriorRows:
    """The bag-of-words head's parameters at a shortlist's ids: table rows w_shared (F, D), w_own (B, K, D) (compute
    dtype), biases b_shared (F,), b_own (B, K) and `bow_seen` shifts seen_shared (F,), seen_own (B, K) (float32)."""

    w_shared: torch.Tensor
    b_shared: torch.Tensor
    seen_shared: torch.Tensor
    w_own: torch.Tensor
    b_own: torch.Tensor
    seen_own: torch.Tensor

    def rows(self, idx) -> PriorRows:
        return PriorRows(self.w_shared, self.b_shared, self.seen_shared, self.w_own[idx], self.b_own[idx],
                         self.seen_own[idx])

    def twice(self) -> PriorRows:
        return PriorRows(self.w_shared, self.b_shared, self.seen_shared, torch.cat([self.w_own] * 2),
                         torch.cat([self.b_own] * 2), torch.cat([self.seen_own] * 2))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a layer's output has here: autocast's for the weight's device when it is on, else the weight's."""
    kind = weight.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


class Decoder(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        max_length: int,
        pretrained=None,
        encoder_ids: list[int] | None = None,
        hypothesis_dim: int = 0,
    ):
        """hypothesis_dim > 0 (the encoder width; diffusion.corrector > 0): the trained corrector's map from a
        hypothesis's re-embedded vector into the latent (hypothesis_latent), zero-initialised."""
        super().__init__()
        arch = resolve_arch(cfg, pretrained)
        if cfg.positions == "rope" and cfg.prefix_tokens == 0:
            # rotations only reweight attention; over identical [MASK] values every position gets the same output
            raise ConfigError(
                "model.positions = rope needs model.prefix_tokens > 0: with RoPE alone an all-[MASK] input gives "
                "every position the same output; use positions = learned or both"
            )
        D = arch.dim
        self.arch = arch
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.latent_dim = cfg.latent_dim
        self.num_prefix = cfg.prefix_tokens
        self.tie_embeddings = cfg.tie_embeddings

        # conditioning c = time MLP + latent MLP; z_null is the classifier-free-guidance null latent
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, D), nn.SiLU(), nn.Linear(D, D))
        self.z_embed = nn.Sequential(nn.Linear(cfg.latent_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.z_null = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.hyp_proj = nn.Linear(hypothesis_dim, cfg.latent_dim) if hypothesis_dim > 0 else None

        self.tok_emb = nn.Embedding(vocab_size, D)
        learned = cfg.positions in ("learned", "both")
        self.pos_emb = nn.Parameter(torch.zeros(max_length, D)) if learned else None
        if self.num_prefix > 0:
            self.prefix_proj = nn.Linear(cfg.latent_dim, self.num_prefix * D)
            self.prefix_pos = nn.Parameter(torch.zeros(self.num_prefix, D))
        if cfg.cross_tokens < 0:
            raise ConfigError(f"model.cross_tokens must be >= 0 (0 = no cross-attention), got {cfg.cross_tokens}")
        self.num_cross = cfg.cross_tokens
        if self.num_cross > 0:  # z' -> K context tokens (B, K, D) every block cross-attends to
            self.cross_proj = nn.Linear(cfg.latent_dim, self.num_cross * D)
            self.cross_pos = nn.Parameter(torch.zeros(self.num_cross, D))
            self.cross_norm = nn.LayerNorm(D)
        # per-position map z -> (max_length, D) added at [MASK] inputs
        self.z_pos = nn.Linear(cfg.latent_dim, max_length * D) if cfg.z_positions else None
        # self-conditioning: the previous estimate's output features (B, L, D) -> added at [MASK] inputs
        self.self_condition = bool(cfg.self_condition)
        self.sc_proj = nn.Linear(D, D) if self.self_condition else None
        self.emb_norm = nn.LayerNorm(D, eps=arch.eps) if arch.kind == "pretrained" else nn.Identity()
        self.emb_drop = nn.Dropout(cfg.dropout)

        if cfg.positions in ("rope", "both"):
            cos, sin = rope_tables(self.num_prefix + max_length, D // arch.num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

        if arch.kind == "dit":
            self.blocks = nn.ModuleList(
                DiTBlock(D, arch.num_heads, arch.mlp_hidden, D, cfg.dropout, cross=self.num_cross > 0)
                for _ in range(cfg.num_layers)
            )
        else:
            self.blocks = nn.ModuleList(
                PretrainedBlock(D, arch.num_heads, arch.mlp_hidden, D, cfg.dropout, arch.eps, arch.act,
                                cross=self.num_cross > 0)
                for _ in range(cfg.num_layers)
            )
        self.final = FinalLayer(D, D, vocab_size, cfg.tie_embeddings, arch.act, arch.eps)
        # bag-of-words prior: z -> (B, V) presence logits against its own copy of the token embeddings (own:
        # measured better than sharing the decoder's input table, which it would pull around); added to the
        # output logits as bow_scale * log sigmoid(.), a direct per-sentence "which words" channel
        if cfg.bow_head:
            self.bow_mlp = nn.Sequential(nn.Linear(cfg.latent_dim, D), nn.GELU(), nn.Linear(D, D), nn.LayerNorm(D))
            self.bow_emb = nn.Parameter(torch.zeros(vocab_size, D))
            self.bow_bias = nn.Parameter(torch.zeros(vocab_size))
            self.bow_scale = nn.Parameter(torch.zeros(()))
            self.bow_seen = nn.Parameter(torch.zeros(vocab_size))
            self.bow_scale_init, self.bow_seen_init = cfg.bow_scale_init, cfg.bow_seen_init
        else:
            self.bow_mlp = None

        self.initialize_weights(pretrained if _is_hf_model(pretrained) else None, encoder_ids)

    # -----------------------------------------------------------------------------------------------------
    # init

    @torch.no_grad()
    def initialize_weights(self, pretrained=None, encoder_ids: list[int] | None = None) -> None:
        """All initialisation: generic init, zeroed AdaLN modulation and output bias, then (when given) the
        pretrained encoder's weights."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        for m in (*self.t_embed, *self.z_embed):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.z_null)  # a prior-like sample; learned
        if self.pos_emb is not None:
            nn.init.normal_(self.pos_emb, std=0.02)
        if self.num_prefix > 0:
            nn.init.normal_(self.prefix_pos, std=0.02)
        if self.num_cross > 0:
            nn.init.normal_(self.cross_pos, std=0.02)
            for block in self.blocks:  # zero: every block is unchanged (the pretrained layer) at step 0
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        if self.sc_proj is not None:  # zero: no estimate and any estimate give the same output at step 0
            nn.init.zeros_(self.sc_proj.weight)
            nn.init.zeros_(self.sc_proj.bias)
        if self.hyp_proj is not None:  # zero: a hypothesis changes nothing until the corrector rows train it
            nn.init.zeros_(self.hyp_proj.weight)
            nn.init.zeros_(self.hyp_proj.bias)
        if self.z_pos is not None:  # zero: the pretrained embedding of [MASK] at step 0
            nn.init.zeros_(self.z_pos.weight)
            nn.init.zeros_(self.z_pos.bias)
        for module in (*self.blocks, self.final):
            nn.init.zeros_(module.adaLN_modulation[-1].weight)
            nn.init.zeros_(module.adaLN_modulation[-1].bias)
        if self.tie_embeddings:
            nn.init.zeros_(self.final.bias)
        else:
            nn.init.zeros_(self.final.linear.weight)
            nn.init.zeros_(self.final.linear.bias)
        if pretrained is not None:
            self._copy_pretrained(pretrained, encoder_ids)
        if self.bow_mlp is not None:
            # presence prior ~ 25 tokens out of V before training (a constant: softmax-invariant in the decoder's
            # logits); output rows start as the token embeddings (the pretrained ones when copied above)
            nn.init.constant_(self.bow_bias, -math.log(max(2.0, self.vocab_size / 25.0)))
            self.bow_emb.copy_(self.tok_emb.weight)
            nn.init.constant_(self.bow_scale, self.bow_scale_init)
            nn.init.constant_(self.bow_seen, self.bow_seen_init)

    def _copy_pretrained(self, pretrained, encoder_ids: list[int] | None) -> None:
        base = getattr(pretrained, "base_model", pretrained)
        emb = base.embeddings
        if encoder_ids is None or len(encoder_ids) != self.vocab_size:
            n = None if encoder_ids is None else len(encoder_ids)
            raise ValueError(
                f"pretrained init needs encoder_ids for all {self.vocab_size} decoder ids, got {n}"
            )
        table = emb.word_embeddings.weight  # (V_enc, D)
        ids = torch.as_tensor(encoder_ids, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]:
            raise ValueError(f"encoder_ids out of range for an encoder vocabulary of {table.shape[0]}")
        rows = table[ids].float()
        type_emb = getattr(emb, "token_type_embeddings", None)
        if type_emb is not None:
            # the encoder adds token type 0 everywhere; folded into the token rows (softmax-invariant when tied)
            rows = rows + type_emb.weight[0].float()
        self.tok_emb.weight.copy_(rows)
        if self.pos_emb is not None:
            # XLM-R-style embeddings count positions from padding_idx + 1
            offset = emb.padding_idx + 1 if hasattr(emb, "create_position_ids_from_input_ids") else 0
            pos = emb.position_embeddings.weight
            if offset + self.max_length > pos.shape[0]:
                raise ConfigError(
                    f"data.max_length = {self.max_length} exceeds the encoder's {pos.shape[0] - offset} positions"
                )
            self.pos_emb.copy_(pos[offset : offset + self.max_length].float())
        self.emb_norm.load_state_dict(emb.LayerNorm.state_dict())
        for block, layer in zip(self.blocks, base.encoder.layer, strict=False):
            block.load_hf_layer(layer)

    # -----------------------------------------------------------------------------------------------------
    # forward

    def condition(
        self, t: torch.Tensor, z: torch.Tensor, uncond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,), z (B, Dz), uncond (B,) bool -> c (B, D), the effective latent z' (B, Dz)."""
        if uncond is not None:
            z = torch.where(uncond[:, None], self.z_null.to(z.dtype).expand_as(z), z)
        c = self.t_embed(timestep_embedding(t, FREQ_DIM)) + self.z_embed(z)
        return c, z

    def hidden(
        self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, uncond: torch.Tensor | None = None,
        sc: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states after the last block (B, L, D), prefix dropped, and the condition c (B, D)."""
        h, c, _ = self._hidden(x_t, t, z, uncond, sc)
        return h, c

    def features(
        self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, uncond: torch.Tensor | None = None,
        sc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The output features at every position (B, L, D): what the output table scores, and what a
        self-conditioned decoder takes back as `sc` at the next denoising step."""
        h, c, _ = self._hidden(x_t, t, z, uncond, sc)
        return self.final.features(h, c)

    def _condition_rows(self, x_t, t, z, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """Check x_t's length, broadcast a scalar t to its rows: (c (B, D), z' (B, Dz)) as `condition`."""
        B, L = x_t.shape
        if L > self.max_length:
            raise ValueError(f"sequence length {L} exceeds the decoder's max_length {self.max_length}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(B)
        return self.condition(t, z, uncond)

    def _prepend_prefix(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h (B, L, D) with the P prefix tokens made from z' (B, Dz) in front: (B, P + L, D); h itself when P = 0."""
        if self.num_prefix == 0:
            return h
        prefix = self.prefix_proj(z).view(h.shape[0], self.num_prefix, -1) + self.prefix_pos  # (B, P, D)
        return torch.cat([prefix.to(h.dtype), h], dim=1)

    def _context(self, z: torch.Tensor) -> torch.Tensor | None:
        """The context tokens every block cross-attends to, made from z' (B, Dz): (B, K, D); None when K = 0."""
        if self.num_cross == 0:
            return None
        tokens = self.cross_proj(z).view(z.shape[0], self.num_cross, -1) + self.cross_pos
        return self.cross_norm(tokens)

    def _key_mask(self, widths: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor | None:
        """(B, P + L) bool: the prefix and each row's first widths[b] positions (the keys its queries attend to);
        None (attend to all) without widths."""
        if widths is None:
            return None
        B, L = x_t.shape
        widths = widths.to(device=x_t.device, dtype=torch.long)
        if widths.shape != (B,) or bool((widths < 1).any()) or bool((widths > L).any()):
            raise ValueError(f"widths must be ({B},) integers in 1..{L} (the row length), got {widths.tolist()}")
        P = self.num_prefix
        return torch.arange(P + L, device=x_t.device)[None, :] < (P + widths)[:, None]

    def _hidden(
        self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, uncond: torch.Tensor | None = None,
        sc: torch.Tensor | None = None, widths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L = x_t.shape
        key_mask = self._key_mask(widths, x_t)
        c, z = self._condition_rows(x_t, t, z, uncond)
        h = self.tok_emb(x_t)  # (B, L, D)
        if self.pos_emb is not None:
            h = h + self.pos_emb[:L]
        if self.z_pos is not None:
            zp = self.z_pos(z).view(B, self.max_length, -1)[:, :L]  # (B, L, D)
            h = h + zp.to(h.dtype) * (x_t == MASK_ID).unsqueeze(-1).to(h.dtype)
        if self.sc_proj is not None:  # no estimate (sc None) counts as all-zero features
            if sc is None:
                est = self.sc_proj.bias.to(h.dtype)  # (D,) = sc_proj(0)
            elif sc.shape != h.shape:
                raise ValueError(f"sc must be (B, L, D) = {tuple(h.shape)}, got {tuple(sc.shape)}")
            else:
                est = self.sc_proj(sc.to(h.dtype))  # (B, L, D)
            h = h + est * (x_t == MASK_ID).unsqueeze(-1).to(h.dtype)
        P = self.num_prefix
        h = self.emb_drop(self.emb_norm(self._prepend_prefix(h, z)))
        rope = None
        if self.rope_cos is not None:
            rope = (self.rope_cos[: P + L], self.rope_sin[: P + L])
        ctx = self._context(z)
        for block in self.blocks:
            h = block(h, c, rope, key_mask, ctx)
        return h[:, P:], c, z

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        uncond: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        sc: torch.Tensor | None = None,
        return_features: bool = False,
        shortlist: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv: KVState | None = None,
        widths: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x_t (B, L) long, t (B,) in [0, 1], z (B, Dz), uncond (B,) bool, select (B, L) bool ->
        logits (B, L, V), or (N, V) for the N selected positions in row-major order.

        Sampled-softmax training (`columns` (C,) vocabulary ids and `target` (N,), with `select`): logits
        (N, C + 1), the C columns followed by each row's logit of its own target; the (D x V) product shrinks
        to (D x (C + 1)).

        Self-conditioning (model.self_condition): `sc` (B, L, D) is the previous estimate's output features,
        added through `sc_proj` at the [MASK] inputs (None = no estimate); `return_features` also returns this
        call's features at every position (B, L, D), the next step's `sc`: (logits, features).

        Shortlist decoding (`shortlist` = (shared (F,) ids, per_row (B, K) ids), with `select`): logits (N, F + K),
        each selected position scored against the shared ids and its own row's ids only: exactly the full
        logits at those ids, for a fraction of the (D x V) product.

        Reused keys / values (`kv`, a KVState; sampling.kv_refresh): with kv.cache None every position is run
        and kv.cache is set to each block's (keys, values) (B, H, L, hd); with kv.cache and kv.positions (B, r)
        only those positions are run (the selected ones must be among them), attending to the cached keys /
        values elsewhere, and kv.cache is updated at them. Approximate: cached entries were computed from an
        earlier state and time. The logits are as without kv. A full pass with `widths` runs only the positions
        inside them (packed; the others' entries are zero and never attended to); so does a call with widths and
        without kv, where the decoder supports kv (a full pass whose cache is dropped).

        Row widths (`widths` (B,) long in 1..L, decoding): row b is the sequence of its first widths[b] positions,
        as if it were alone in a batch of that length: no position attends to keys beyond its row's width (their
        outputs are not meaningful; select none of them). None: every row is L long.

        Shared null rows (decoding, `share_null_rows`): without kv, unconditional rows with the same ids, time and
        width run once and their outputs are copied (guidance's null pass at the first step: one run per length)."""
        groups = None
        if kv is None and sc is None and not return_features and columns is None and self.share_null_rows:
            groups = self._null_groups(x_t, t, uncond, widths)
        if groups is None:
            h, c, z_eff = self._dispatch_hidden(x_t, t, z, uncond, sc, return_features, columns, kv, widths)
        else:  # identical unconditional rows run once, their outputs are copied to the others
            first, inverse = groups
            t_rows = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
            h, c, z_eff = self._dispatch_hidden(x_t[first], t_rows[first], z[first], uncond[first], None, False,
                                                None, None, None if widths is None else widths[first])
            h, c, z_eff = h[inverse], c[inverse], z_eff[inverse]
        embedding = self.tok_emb.weight if self.tie_embeddings else None
        feats = None
        if shortlist is not None:
            if select is None or columns is not None:
                raise ValueError("shortlist needs select and excludes columns")
            sl = shortlist if isinstance(shortlist, Shortlist) else self.prepare_shortlist(*shortlist)
            if return_features:
                feats = self.final.features(h, c)  # (B, L, D)
                f = feats[select]
            else:
                f = self.final.features(h, c, select)  # (N, D): only the selected positions pay for the transform
            logits = self._shortlist_logits(f, select, sl, self._shortlist_prior(z_eff, x_t, sl))
            return logits if feats is None else (logits, feats)
        if return_features:
            if columns is not None:
                raise ValueError("return_features is for full-vocabulary calls, not sampled-softmax training")
            feats = self.final.features(h, c)  # (B, L, D)
            f = feats if select is None else feats[select]
            logits = self.final.project(f, embedding)
        elif columns is None:
            logits = self.final(h, c, select, embedding)
        else:
            if select is None or target is None:
                raise ValueError("columns needs select and target (sampled-softmax training)")
            f = self.final.features(h, c, select)  # (N, D)
            logits = torch.cat(
                [self.final.project(f, embedding, columns), self.final.target_logits(f, target, embedding)[:, None]],
                dim=1,
            )  # (N, C + 1)
        logits = self._add_prior(logits, z_eff, x_t, select, columns, target)
        return logits if feats is None else (logits, feats)

    supports_widths = True  # forward takes each row's own width (widths=...)
    # decoding (no grad) runs unconditional rows with the same ids, time and width once (the null pass of
    # guidance at the first MaskGIT step: every row of one length is all [MASK]); False runs every row
    share_null_rows = True

    def _dispatch_hidden(self, x_t, t, z, uncond, sc, return_features, columns, kv, widths):
        """(h (B, L, D), c (B, D), z' (B, Dz)) for forward: the packed / key-value path or the plain one."""
        if (kv is None and widths is not None and self.supports_kv and sc is None and not return_features
                and columns is None):
            kv = KVState()  # a packed full pass: only the positions inside the widths run; its cache is dropped
        if kv is not None:
            if sc is not None or return_features or columns is not None:
                raise ValueError("kv (decoding with reused keys / values) excludes sc, return_features and columns")
            return self._hidden_kv(x_t, t, z, uncond, kv, widths)
        return self._hidden(x_t, t, z, uncond, sc, widths)

    def _null_groups(self, x_t, t, uncond, widths) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decoding only: (first (U,), inverse (B,)) when some unconditional rows (uncond) share their ids, time
        and width: run rows `first`, row b's outputs are row inverse[b]'s. None when there is nothing to share
        (training, no unconditional rows, all rows distinct)."""
        B = x_t.shape[0]
        if uncond is None or B < 2 or torch.is_grad_enabled() or int(uncond.sum()) < 2:
            return None
        device = x_t.device
        t_bits = torch.as_tensor(t, dtype=torch.float32, device=device).expand(B).contiguous().view(torch.int32)
        w = torch.full((B,), x_t.shape[1], dtype=torch.long, device=device) if widths is None else widths.long()
        # conditional rows never share (their z differ): each gets its own key column value
        own = torch.where(uncond, -1, torch.arange(B, device=device))
        key = torch.cat([x_t.long(), w[:, None], t_bits.long()[:, None], own[:, None]], dim=1)  # (B, L + 3)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        U = int(inverse.max()) + 1
        if U == B:
            return None
        first = torch.full((U,), B, dtype=torch.long, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(B, device=device), reduce="amin")  # each group's first row
        order = torch.argsort(first)  # run the groups in row order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(U, device=device)
        return first[order], rank[inverse]

    @property
    def supports_kv(self) -> bool:
        """Whether forward(kv=...) can run this decoder: learned positions only, no self-conditioning, no
        z_positions (their inputs are not per-position token embeddings). Prefix tokens are run in full passes and
        kept, like any position not run, in between."""
        return not (self.pos_emb is None or self.rope_cos is not None or self.sc_proj is not None
                    or self.z_pos is not None)

    def _hidden_kv(self, x_t, t, z, uncond, kv: KVState, widths: torch.Tensor | None = None):
        """_hidden with reused keys / values (see forward): (h (B, L, D) zero outside the positions run, c, z')."""
        if not self.supports_kv:
            raise ConfigError("sampling.kv_refresh supports decoders with learned positions and without "
                              "self-conditioning or z_positions; set sampling.kv_refresh: 0")
        B, L = x_t.shape
        P = self.num_prefix  # the cache holds P prefix entries, then the L positions
        c, z = self._condition_rows(x_t, t, z, uncond)
        key_mask = self._key_mask(widths, x_t)
        at = at_cache = None  # a full pass runs every position (inside the widths); later ones kv.positions
        kept = kv.cache  # each block's (keys, values) the packed positions attend to
        if kv.cache is None and key_mask is not None:
            # packed full pass: the prefix and each row's positions inside its width, against zero entries
            row, slot = key_mask.nonzero(as_tuple=True)  # (M,) row-major, slot = cache position
            at_cache = PackedPositions(row, slot, slot, P + L)
            h = self._prepend_prefix(self.tok_emb(x_t) + self.pos_emb[:L], z)[row, slot]  # (M, D)
            H, hd = self.blocks[0].attn.num_heads, self.blocks[0].attn.head_dim
            zero = torch.zeros(B, H, P + L, hd, dtype=compute_dtype(self.tok_emb.weight), device=x_t.device)
            kept = [(zero, zero)] * len(self.blocks)  # never written: not in place, forward_packed builds new ones
        elif kv.cache is None:
            h = self._prepend_prefix(self.tok_emb(x_t) + self.pos_emb[:L], z)
        else:
            idx = kv.positions
            valid = torch.ones_like(idx, dtype=torch.bool) if kv.valid is None else kv.valid
            row, slot = valid.nonzero(as_tuple=True)  # (M,) row-major
            at = PackedPositions(row, idx[row, slot], slot, idx.shape[1])
            h = self.tok_emb(x_t[row, at.pos]) + self.pos_emb.index_select(0, at.pos)  # (M, D)
        h = self.emb_drop(self.emb_norm(h))
        if at is not None:
            at_cache = at if P == 0 else PackedPositions(at.row, at.pos + P, at.slot, at.width)
        cache = []
        ctx = self._context(z)
        for i, block in enumerate(self.blocks):
            h, pair = block.forward_kv(h, c, None if at_cache is None else kept[i], at_cache, key_mask,
                                       inplace=kv.writable and at is not None, ctx=ctx)
            cache.append(pair)
        kv.cache = cache
        if at_cache is None:
            return h[:, P:], c, z
        # back to (B, L, D), zero outside the positions run (the prefix's outputs are not needed)
        D = h.shape[-1]
        row, pos = at_cache.row, at_cache.pos - P
        if P > 0:
            keep = pos >= 0
            row, pos, h = row[keep], pos[keep], h[keep]
        h = h.new_zeros(B * L, D).index_copy_(0, row * L + pos, h).view(B, L, D)
        return h, c, z

    def prepare_shortlist(self, shared: torch.Tensor, per_row: torch.Tensor) -> Shortlist:
        """A Shortlist of ids shared (F,) and per_row (B, K) with their output-table (and bag-of-words table) rows
        gathered now, cast to autocast's dtype when autocast is on for the table's device (forward would cast
        them at every call)."""
        weight, bias = self.final.output_table(self.tok_emb.weight if self.tie_embeddings else None)
        dtype = compute_dtype(weight)
        prior = None
        if self.bow_mlp is not None:
            seen = self.bow_seen.float()
            prior = PriorRows(self.bow_emb[shared].to(dtype), self.bow_bias[shared], seen[shared],
                              self.bow_emb[per_row].to(dtype), self.bow_bias[per_row], seen[per_row])
        return Shortlist(shared, per_row, weight[shared].to(dtype), bias[shared], weight[per_row].to(dtype),
                         bias[per_row], prior)

    def _shortlist_logits(self, f, select, sl: Shortlist, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Output logits (N, F + K) at the selected positions (features f (N, D), row-major) over the shared and the
        row's own shortlist ids, plus each row's `prior` (B, F + K) float32 when given (then float32, summed into
        the gathered prior in place: no separate (N, F + K) buffers for the sum). The own ids' product runs per
        row on its selected positions, padded to the largest count of a row."""
        head = F.linear(f, sl.w_shared, sl.b_shared)  # (N, F)
        rows = select.nonzero()[:, 0]  # (N,)
        slot = (select.cumsum(dim=1) - 1)[select]  # (N,) rank of the position among its row's selected ones
        width = int(select.sum(dim=1).max()) if rows.numel() else 0
        padded = f.new_zeros(select.shape[0], width, f.shape[-1]).index_put_((rows, slot), f)  # (B, m, D)
        own = torch.bmm(padded, sl.w_own.transpose(1, 2))[rows, slot] + sl.b_own[rows]  # (N, K)
        if prior is None:
            return torch.cat([head, own.to(head.dtype)], dim=1)
        out = prior.index_select(0, rows)  # (N, F + K) float32, ours
        F_ = head.shape[1]
        out[:, :F_] += head
        out[:, F_:] += own.to(head.dtype)  # rounded as in the full-vocabulary product
        return out

    def _shortlist_prior(self, z_eff, x_t, sl: Shortlist) -> torch.Tensor | None:
        """Each row's scaled bag-of-words prior at its shortlist columns (B, F + K) float32; None without a
        bag-of-words head. bow_prior at the F + K columns only: the same sums as its (B, V) product, gathered
        before, not after."""
        if sl.prior is None:
            return None
        p, B = sl.prior, x_t.shape[0]
        hz = self.bow_mlp(z_eff)  # (B, D)
        s = torch.cat([F.linear(hz, p.w_shared, p.b_shared).float(),
                       (torch.bmm(p.w_own, hz[:, :, None])[..., 0] + p.b_own).float()], dim=1)  # (B, F + K)
        visible = torch.zeros(B, self.vocab_size, dtype=torch.bool, device=x_t.device)
        visible.scatter_(1, x_t, True)
        visible[:, PAD_ID] = False  # as in bow_prior
        visible[:, MASK_ID] = False
        cols = torch.cat([sl.shared[None, :].expand(B, -1), sl.per_row], dim=1)  # (B, F + K)
        shift = torch.cat([p.seen_shared[None, :].expand(B, -1), p.seen_own], dim=1)  # (B, F + K)
        return self.bow_scale * F.logsigmoid(s + visible.gather(1, cols) * shift)

    def _add_prior(self, logits, z_eff, x_t, select, columns, target) -> torch.Tensor:
        """The logits plus the scaled bag-of-words prior (unchanged without a bag-of-words head)."""
        if self.bow_mlp is None:
            return logits
        prior = self.bow_prior(z_eff, x_t)  # (B, V)
        if select is None:
            return logits + self.bow_scale * prior[:, None, :].to(logits.dtype)
        rows = torch.arange(x_t.shape[0], device=x_t.device)[:, None].expand_as(select)[select]  # (N,)
        if columns is not None:
            prior = torch.cat([prior[:, columns][rows], prior[rows, target][:, None]], dim=1)  # (N, C + 1)
            return logits + self.bow_scale * prior.to(logits.dtype)
        return logits + self.bow_scale * prior[rows].to(logits.dtype)

    def bow_prior(self, z: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """log P(token among the sentence's still-hidden tokens) (B, V) float32: log sigmoid of the presence
        logits, shifted by the learned per-token `bow_seen` for tokens already visible in x_t (B, L)."""
        s = self.bow_logits(z).float()  # (B, V)
        seen = torch.zeros_like(s).scatter_(1, x_t, 1.0)
        seen[:, PAD_ID] = 0.0  # PAD fills the tail many times over; MASK is never a target
        seen[:, MASK_ID] = 0.0
        return F.logsigmoid(s + seen * self.bow_seen.float())

    def hypothesis_latent(self, z: torch.Tensor, e_hyp: torch.Tensor) -> torch.Tensor:
        """The corrector's condition: z (B, Dz) + W e_hyp, e_hyp (B, De) the hypothesis's re-embedded vector."""
        if self.hyp_proj is None:
            raise RuntimeError("this decoder was built without a hypothesis input (diffusion.corrector: 0)")
        return z + self.hyp_proj(e_hyp.to(self.hyp_proj.weight.dtype)).to(z.dtype)

    def bow_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Dz) -> (B, V) logits of each vocabulary token occurring in the sentence."""
        return F.linear(self.bow_mlp(z), self.bow_emb, self.bow_bias)
