"""Classifier-free guidance as a wrapper around the model.

    guided(model, s)(x_t, t, z, uncond=None, select=None) = out_null + s * (out_cond - out_null)

where out_cond is the model's output with the condition z and out_null its output with the learned null
condition (uncond=True). s = 1 is the conditional model exactly (the model is called once, output untouched);
s = 0 is unconditional generation (only the null pass runs); any other s runs the conditional and the null
pass as ONE forward over a batch of 2B rows and combines them in float32.

The wrapper is generic over what the model returns: logits (MaskGIT on the masked process) or log-scores
(SEDD). The outputs are expected to be finite; processes that forbid entries (e.g. the MASK logit) set them
to -inf after guidance, not inside the model, since -inf - (-inf) is undefined.

The raw output of the 2B-row forward belongs to the wrapper alone: when it is float32 the result is written
over its conditional half (no fresh (N, V) buffer, whose page faults cost more than the arithmetic on CPU);
a bf16 output is combined into a new float32 tensor. The returned tensor may be modified by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sgdd.models.decoder import KVState, Shortlist

ModelFn = Callable[..., torch.Tensor]


def _twice(v: torch.Tensor | None) -> torch.Tensor | None:
    """Stack a per-row input on itself along the batch: (B, ...) -> (2B, ...); scalars and None pass through."""
    if v is None or v.dim() == 0:
        return v
    return torch.cat([v, v], dim=0)


# Row-wise work on (N, V) outputs runs in slices of about this many elements: a slice stays in the CPU's
# cache across the few passes made over it (measured 2-3x faster than whole-tensor passes at V = 20k).
CHUNK_ELEMS = 1 << 18


def row_slices(num_rows: int, row_numel: int, device: torch.device) -> list[slice]:
    """Slices of rows covering range(num_rows), about CHUNK_ELEMS elements each on CPU; one slice elsewhere."""
    if device.type != "cpu":
        return [slice(0, num_rows)]
    step = max(1, CHUNK_ELEMS // max(1, row_numel))
    return [slice(i, min(i + step, num_rows)) for i in range(0, num_rows, step)]


def combine(
    cond: torch.Tensor, null: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """null + scale * (cond - null) in float32 (inputs may be bf16); same shape as the inputs.

    out: a float32 tensor of that shape to write into; it may be `cond` itself (elementwise, so safe), which
    saves allocating a fresh (N, V) buffer: on CPU that allocation's page faults cost more than the arithmetic.
    """
    if out is None:
        out = torch.empty(cond.shape, dtype=torch.float32, device=cond.device)
    if cond.numel() == 0:
        return out
    V = cond.shape[-1]
    c2, n2, o2 = cond.reshape(-1, V), null.reshape(-1, V), out.view(-1, V)  # (rows, V)
    for rows in row_slices(c2.shape[0], V, cond.device):
        torch.lerp(n2[rows].float(), c2[rows].float(), float(scale), out=o2[rows])
    return out


def guidance_passes(scale: float) -> int:
    """Model passes per call of guided(model, scale): 1 at scale 1 (conditional only) or 0 (null only), else 2."""
    return 1 if float(scale) in (0.0, 1.0) else 2


def guided(model: ModelFn, scale: float) -> ModelFn:
    """Wrap `model` (signature of Decoder.forward) into a guided model with the same signature.

    The wrapped call takes x_t (B, L) long, t (B,), z (B, Dz), uncond (B,) bool | None, select (B, L) bool | None
    and returns what the model returns: (B, L, V), or (N, V) for the N selected positions in row-major order.
    A caller-given `uncond` applies to the conditional pass (rows already unconditional stay so).
    Self-conditioned models: `sc` / `return_features` pass through to the model; with guidance (`passes` = 2)
    `sc` and the returned features hold 2B rows, the conditional pass's first. `passes` (an attribute of the
    returned function) is the number of model passes per call, 1 or 2. A `shortlist` (shared ids, per-row ids
    (B, K)) passes through too, the per-row ids doubled for the null rows; so does `kv` (reused keys / values,
    sgdd.models.decoder.KVState: its cache holds 2B rows, its positions and valid marks are doubled), and
    `widths` (B,) (each row's own width), doubled.
    """
    scale = float(scale)

    if scale == 1.0:

        def conditional(x_t, t, z, uncond=None, select=None, **sc_kw):
            return model(x_t, t, z, uncond=uncond, select=select, **sc_kw)

        conditional.passes = 1
        return conditional

    if scale == 0.0:

        def unconditional(x_t, t, z, uncond=None, select=None, **sc_kw):
            B = x_t.shape[0]
            null = torch.ones(B, dtype=torch.bool, device=x_t.device)
            return model(x_t, t, z, uncond=null, select=select, **sc_kw)

        unconditional.passes = 1
        return unconditional

    def cfg(x_t, t, z, uncond=None, select=None, sc=None, return_features=False, shortlist=None, kv=None,
            widths=None):
        B = x_t.shape[0]
        cond_rows = uncond if uncond is not None else torch.zeros(B, dtype=torch.bool, device=x_t.device)
        null_rows = torch.ones(B, dtype=torch.bool, device=x_t.device)
        # self-conditioning: sc holds 2B rows, the conditional pass's estimates first, the null pass's second
        sc_kw = {} if sc is None and not return_features else {"sc": sc, "return_features": return_features}
        if shortlist is not None:  # (shared ids, per-row ids): the null rows use their conditional row's ids
            sc_kw["shortlist"] = (shortlist.twice() if isinstance(shortlist, Shortlist)
                                  else (shortlist[0], _twice(shortlist[1])))
        if kv is not None:  # reused keys / values: kv.cache holds 2B rows (conditional first), as sc does
            inner = KVState(kv.cache, _twice(kv.positions), _twice(kv.valid), kv.writable)
            sc_kw["kv"] = inner
        if widths is not None:
            sc_kw["widths"] = _twice(widths)
        out = model(  # (2B, L, V) or (2N, V): the conditional rows first, the null rows second
            _twice(x_t), _twice(t), _twice(z), uncond=torch.cat([cond_rows, null_rows]), select=_twice(select),
            **sc_kw,
        )
        if kv is not None:
            kv.cache = inner.cache
        feats = None
        if return_features:
            out, feats = out
        half = out.shape[0] // 2
        cond, null = out[:half], out[half:]
        # the raw output is ours alone: a float32 one takes the result in place of its conditional half
        reuse = cond.dtype == torch.float32 and not cond.requires_grad
        result = combine(cond, null, scale, out=cond if reuse else None)
        return result if feats is None else (result, feats)

    cfg.passes = 2
    return cfg
