"""Building blocks of the decoder: modulation, timestep embedding, RoPE, attention, the two block types, the
final layer.

Two block types share one conditioning interface, `block(x (B, L, D), c (B, Dc), rope) -> (B, L, D)`, optionally
with context tokens ctx (B, K, D) made from z that every position cross-attends to (model.cross_tokens):

- `DiTBlock`: pre-LN AdaLN-Zero (DiT). c gives shift/scale/gate for the attention and MLP branches; with the
  modulation zeroed every gate is 0 and the block is the identity.
- `PretrainedBlock`: a post-LN BERT/XLM-R encoder layer (attention -> add -> LN -> FFN -> add -> LN) with the
  same six modulation vectors, arranged so that zeroed modulation leaves it exactly the pretrained layer:
  the branch inputs are modulated (x * (1 + scale) + shift) and the branch outputs scaled by (1 + gate).

Attention is bidirectional (`attention`: scaled_dot_product_attention, explicit on CPU). In training every
position, padding included, attends to all (padding is a prediction target, not something to hide); a decoding
row narrower than its batch (Decoder.forward(widths=...)) masks the keys beyond its width. Parameters stay
float32; autocast does the casting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# pure functions


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, D); shift, scale (B, D) per sequence -> x * (1 + scale) + shift.

    One fused pass (addcmul) over the (B, L, D) tensor instead of a multiply and an add, which allocates one fresh
    buffer fewer: with the gated residuals fused the same way, decoding ran 4 % faster in a process without
    sgdd.cli.tune_malloc, and within timing noise with it (bench/RESULTS.md "Ninth round")."""
    return _modulate(x, shift.unsqueeze(1), scale.unsqueeze(1))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with shift, scale already broadcastable against x."""
    return torch.addcmul(shift, x, 1 + scale)


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0
) -> torch.Tensor:
    """Sinusoidal embedding of t (B,) in [0, 1] -> (B, dim) float32. t is scaled by `scale` first so that the
    frequencies resolve the unit interval (DiT's integer-timestep convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (length, head_dim) for rotary position embedding (rotate-half layout)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None]  # (length, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, hd)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd); cos, sin (L, hd) -> x rotated by position."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for q (B, H, Lq, hd), k, v (B, H, Lk, hd); unmasked, or with key_mask (B, Lk)
    bool: each row's queries attend only to its True keys (every row needs at least one).

    scaled_dot_product_attention everywhere except on CPU, where the explicit product is used: for the short
    sequences trained here (L <= 128) the CPU flash kernel under bf16 autocast measured about 8x slower
    (forward + backward, B=64, H=12, L=32, hd=32: 87 ms vs 11 ms on one core); the (B, H, L, L) scores are small.
    """
    if q.device.type != "cpu":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if key_mask is None:
        scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, Lq, Lk)
    else:  # in place on the fresh product; a broadcast add of 0 / -inf measured 3x faster than masked_fill_
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
        bias = torch.zeros(key_mask.shape, dtype=scores.dtype, device=scores.device)
        scores.add_(bias.masked_fill_(~key_mask, float("-inf"))[:, None, None, :])
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs.to(v.dtype), v)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    """An activation function by its transformers name (config.hidden_act)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation '{name}'; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------------------
# modules


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection and no mask."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> q, k, v, each (B, H, L, hd)."""
        B, L, _ = x.shape
        return self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); key_mask (B, L) bool, optional: the positions each row's queries attend to."""
        B, L, D = x.shape
        q, k, v = self._qkv(x)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, p, key_mask)  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))

    def forward_kv(
        self, x: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention over every position for decoding with reused keys / values (no RoPE, no dropout): x (B, L, D)
        -> (out (B, L, D), its (keys, values) (B, H, L, hd)) to keep. key_mask as in forward."""
        B, L, D = x.shape
        q, k, v = self._qkv(x)
        return self.proj(attention(q, k, v, key_mask=key_mask).transpose(1, 2).reshape(B, L, D)), (k, v)

    def forward_packed(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], at: PackedPositions,
        key_mask: torch.Tensor | None = None, inplace: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention for some positions only, against kept keys / values (no RoPE, no dropout).

        x (M, D) holds the M positions `at` (PackedPositions) of B length-L sequences whose keys / values at all
        positions are kv (B, H, L, hd): those at `at` are replaced by x's (in new tensors; in kv itself with
        `inplace`, when kv has the compute dtype), the queries are x's. Returns (out (M, D), the updated (keys,
        values)). The projections run on the M packed positions, the attention on each row's up-to-r queries
        (padded) against its L keys (those of key_mask (B, L) bool only, when given)."""
        M, D = x.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(M, 3, H, hd).unbind(1)  # each (M, H, hd)
        # (B, H, L, hd) viewed as (B, L, H, hd): index_put at (row, pos) writes whole (H, hd) entries
        if inplace and kv[0].dtype == k.dtype and kv[1].dtype == v.dtype:
            kv[0].transpose(1, 2).index_put_((at.row, at.pos), k)
            kv[1].transpose(1, 2).index_put_((at.row, at.pos), v)
            keys, values = kv
        else:
            keys = kv[0].to(k.dtype).transpose(1, 2).index_put((at.row, at.pos), k).transpose(1, 2)
            values = kv[1].to(v.dtype).transpose(1, 2).index_put((at.row, at.pos), v).transpose(1, 2)
        B = keys.shape[0]
        queries = q.new_zeros(B * at.width, H, hd).index_copy_(0, at.row * at.width + at.slot, q)
        queries = queries.view(B, at.width, H, hd)
        out = attention(queries.transpose(1, 2), keys, values, key_mask=key_mask).transpose(1, 2)  # (B, r, H, hd)
        return self.proj(out[at.row, at.slot].reshape(M, D)), (keys, values)


@dataclass
class PackedPositions:
    """M positions of a batch of B sequences, packed row-major: position pos[m] of row row[m], the slot[m]-th run
    position of its row (slot < width)."""

    row: torch.Tensor  # (M,) long
    pos: torch.Tensor  # (M,) long
    slot: torch.Tensor  # (M,) long
    width: int


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act_name = act
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Attention from every position to a few context tokens (B, K, D) made from z (model.cross_tokens). Its own
    query, key / value and output projections; the output projection starts at zero (Decoder.initialize_weights),
    so a block with it is unchanged until it trains."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def context(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ctx (B, K, D) -> keys, values, each (B, H, K, hd)."""
        B, K, _ = ctx.shape
        return self.kv(ctx).view(B, K, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) against keys, values (B, H, K, hd) -> (B, L, D)."""
        B, L, D = x.shape
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        return self.proj(attention(q, keys, values).transpose(1, 2).reshape(B, L, D))

    def packed(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """x (M, D), the packed positions of rows `row` (M,), against their rows' keys, values (B, H, K, hd)."""
        return self(x[:, None], keys.index_select(0, row), values.index_select(0, row))[:, 0]


class ModulatedBlock(nn.Module):
    """A transformer block conditioned on c (B, Dc); subclasses define `_run(x, mods, attn, cross)`, the block
    around an attention function, with `mods` the six modulation vectors (..., 6 D) broadcastable against x, and
    `cross` None or the cross-attention to the context tokens (a function of the block's hidden states)."""

    def _cross(self, ctx: torch.Tensor | None, row: torch.Tensor | None = None):
        """The cross-attention branch for _run: None without context tokens; else h -> its attention to ctx
        (B, K, D) (h (B, L, D), or (M, D) packed positions of rows `row`)."""
        if ctx is None:
            return None
        if self.cross is None:
            raise ValueError("context tokens given to a block without cross-attention")
        keys, values = self.cross.context(ctx)
        if row is None:
            return lambda h: self.cross(h, keys, values)
        return lambda h: self.cross.packed(h, keys, values, row)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope=None, key_mask: torch.Tensor | None = None,
        ctx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, L, D); c (B, Dc); key_mask (B, L) bool, optional (Attention.forward); ctx (B, K, D), optional
        return self._run(x, self.adaLN_modulation(c).unsqueeze(1), lambda h: self.attn(h, rope, key_mask),
                         self._cross(ctx))

    def forward_kv(self, x, c, kv=None, at: PackedPositions | None = None, key_mask: torch.Tensor | None = None,
                   inplace: bool = False, ctx: torch.Tensor | None = None):
        """The block for decoding with reused keys / values -> (x, (keys, values)). kv None: x (B, L, D) is every
        position (Attention.forward_kv). Else x (M, D) holds the packed positions `at` and kv the block's kept
        (keys, values) (Attention.forward_packed); each position gets its row's modulation. key_mask (B, L) bool,
        optional: the positions each row's queries attend to; inplace: update kv in place (forward_packed); ctx
        (B, K, D), optional: the context tokens (each packed position attends to its row's)."""
        out = {}
        if kv is None:
            mods = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 6D)
            cross = self._cross(ctx)

            def attn(h):
                a, out["kv"] = self.attn.forward_kv(h, key_mask)
                return a
        else:
            mods = self.adaLN_modulation(c).index_select(0, at.row)  # (M, 6D)
            cross = self._cross(ctx, at.row)

            def attn(h):
                a, out["kv"] = self.attn.forward_packed(h, kv, at, key_mask, inplace)
                return a

        return self._run(x, mods, attn, cross), out["kv"]


class DiTBlock(ModulatedBlock):
    """Pre-LN transformer block with AdaLN-Zero conditioning; the identity while its modulation is zero."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, cond_dim: int, dropout: float = 0.0,
                 cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, "gelu_tanh")
        self.drop = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        # pre-LN like the other branches: x + cross(norm(x)), between attention and MLP
        self.norm_c = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if cross else None
        self.cross = CrossAttention(dim, num_heads) if cross else None

    def _run(self, x: torch.Tensor, mods: torch.Tensor, attn, cross=None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=-1)
        a = self.drop(attn(_modulate(self.norm1(x), shift_a, scale_a)))
        x = torch.addcmul(x, gate_a, a)
        if cross is not None:
            x = x + self.drop(cross(self.norm_c(x)))
        m = self.drop(self.mlp(_modulate(self.norm2(x), shift_m, scale_m)))
        x = torch.addcmul(x, gate_m, m)
        return x


class PretrainedBlock(ModulatedBlock):
    """Post-LN encoder layer (BERT / XLM-R layout) with AdaLN-Zero-style modulation:

        a = norm1(x + (1 + g_a) * attn(x * (1 + s_a) + b_a))
        y = norm2(a + (1 + g_m) * mlp(a * (1 + s_m) + b_m))

    With (b, s, g) = 0 this is exactly the pretrained layer; `load_hf_layer` copies the weights."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        cond_dim: int,
        dropout: float = 0.0,
        eps: float = 1e-12,
        act: str = "gelu",
        cross: bool = False,
    ):
        super().__init__()
        self.attn = Attention(dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden, act)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        # a + cross(a) after the attention's LayerNorm, before the MLP (zero output at init)
        self.cross = CrossAttention(dim, num_heads) if cross else None

    def _run(self, x: torch.Tensor, mods: torch.Tensor, attn, cross=None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=-1)
        a = self.drop(attn(_modulate(x, shift_a, scale_a)))
        x = self.norm1(torch.addcmul(x, 1 + gate_a, a))
        if cross is not None:
            x = x + self.drop(cross(x))
        m = self.drop(self.mlp(_modulate(x, shift_m, scale_m)))
        return self.norm2(torch.addcmul(x, 1 + gate_m, m))

    @torch.no_grad()
    def load_hf_layer(self, layer: nn.Module) -> None:
        """Copy a transformers BertLayer-like module (attention.self.{query,key,value}, attention.output.{dense,
        LayerNorm}, intermediate.dense, output.{dense,LayerNorm}) into this block."""
        sa, so = layer.attention.self, layer.attention.output
        self.attn.qkv.weight.copy_(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight], dim=0))
        self.attn.qkv.bias.copy_(torch.cat([sa.query.bias, sa.key.bias, sa.value.bias], dim=0))
        self.attn.proj.load_state_dict(so.dense.state_dict())
        self.norm1.load_state_dict(so.LayerNorm.state_dict())
        self.mlp.fc1.load_state_dict(layer.intermediate.dense.state_dict())
        self.mlp.fc2.load_state_dict(layer.output.dense.state_dict())
        self.norm2.load_state_dict(layer.output.LayerNorm.state_dict())


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then logits at the selected positions.

    Tied: a BERT-style prediction transform (dense -> act -> LN) and logits = h @ E^T + bias with E the token
    embedding matrix (passed in). Untied: a linear layer. Either way the output bias starts at zero."""

    def __init__(
        self, dim: int, cond_dim: int, vocab_size: int, tied: bool, act: str = "gelu", eps: float = 1e-12
    ):
        super().__init__()
        self.tied = tied
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        if tied:
            self.transform = nn.Linear(dim, dim)
            self.act = activation(act)
            self.transform_norm = nn.LayerNorm(dim, eps=eps)
            self.bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.linear = nn.Linear(dim, vocab_size)

    def forward(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        select: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # h (B, L, D); c (B, Dc); select (B, L) bool; embedding (V, D) when tied
        return self.project(self.features(h, c, select), embedding)

    def features(self, h: torch.Tensor, c: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """The vectors the output table scores: (B, L, D), or (N, D) at the selected positions."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = modulate(self.norm(h), shift, scale)
        if select is not None:
            h = h[select]  # (N, D), row-major: only these rows pay for the (D x V) product
        if self.tied:
            h = self.transform_norm(self.act(self.transform(h)))
        return h

    def output_table(self, embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (V, D), bias (V,)) of the output product."""
        if self.tied:
            return embedding, self.bias
        return self.linear.weight, self.linear.bias

    def project(
        self, f: torch.Tensor, embedding: torch.Tensor | None = None, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features (..., D) -> logits (..., V), or (..., C) over the vocabulary ids `columns` (C,)."""
        weight, bias = self.output_table(embedding)
        if columns is not None:
            weight, bias = weight[columns], bias[columns]
        return F.linear(f, weight, bias)

    def target_logits(
        self, f: torch.Tensor, target: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features (N, D), target ids (N,) -> each row's logit of its own target (N,)."""
        weight, bias = self.output_table(embedding)
        # a batched matmul, so autocast runs it in the same precision as `project`'s F.linear
        dots = torch.bmm(f.unsqueeze(1), weight[target].unsqueeze(2)).reshape(-1)  # (N,)
        return dots + bias[target].to(dots.dtype)
