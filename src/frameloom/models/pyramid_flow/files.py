"""Pyramid Flow's pre-extracted feature files (jy0205/Pyramid-Flow ``tools/extract_video_vae_latents.py``,
``tools/extract_text_features.py``, read by its ``LengthGroupedVideoTextDataset``):

- ``latent``: a torch file holding the *raw* VAE latent ``(1, 16, T, h, w)`` (bf16 upstream); the training
  loop normalises it (first frame / other frames, per variant);
- ``text_fea``: a torch file holding ``{"prompt_embed": (1, 128, 4096), "prompt_attention_mask": (1, 128),
  "pooled_prompt_embed": (1, P)}``.

``read_latent`` / ``read_text_fea`` turn them into what frameloom's trainer uses (a normalised latent; tokens,
mask and the ``pooled`` extra), refusing files that are not plain tensors (``torch.load(weights_only=True)``).
``write_jsonl`` (``frameloom cache --pyramid-jsonl``) writes a cached run's latents and text in that form with
a jsonl, so Pyramid Flow's own training script reads what frameloom encoded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from frameloom.errors import FrameloomError

from .codec import denormalize_latent, normalize_latent

__all__ = ["read_latent", "read_text_fea", "write_jsonl"]


def _load(path: str | os.PathLike):
    from frameloom.data.dialects.pyramid import load_tensor

    return load_tensor(path)


def read_latent(path: str | os.PathLike, variant: str) -> torch.Tensor:
    """A ``latent`` file -> the normalised latent ``(16, T, h, w)`` float32."""
    z = _load(path)
    if not isinstance(z, torch.Tensor) or z.ndim not in (4, 5) or (z.ndim == 5 and z.shape[0] != 1):
        raise FrameloomError(
            f"{path}: expected a latent tensor (1, C, T, h, w), got {getattr(z, 'shape', type(z))}"
        )
    z = z if z.ndim == 5 else z[None]
    return normalize_latent(z.float(), variant)[0]


def read_text_fea(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A ``text_fea`` file -> (tokens ``(L, D)`` trimmed to the last real token, mask ``(L,)``,
    ``{"pooled": (P,)}``)."""
    fea = _load(path)
    keys = ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")
    if not isinstance(fea, dict) or any(k not in fea for k in keys):
        raise FrameloomError(f"{path}: expected a dict with {', '.join(keys)}")
    emb, mask, pooled = (fea[k].float() if k != "prompt_attention_mask" else fea[k].bool() for k in keys)
    emb, mask, pooled = emb.reshape(-1, emb.shape[-1]), mask.reshape(-1), pooled.reshape(-1)
    length = max(int(mask.nonzero().max()) + 1 if mask.any() else 1, 1)
    return emb[:length] * mask[:length, None], mask[:length], {"pooled": pooled}


def _text_fea(emb: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor, length: int) -> dict:
    """One caption's features as upstream's extract_text_features.py saves them: T5 tokens ``(L, D)`` padded
    to ``length`` with their mask, and the pooled CLIP vector ``(P,)``, each with a batch of one."""
    padded = torch.zeros(1, length, emb.shape[-1])
    padded_mask = torch.zeros(1, length, dtype=torch.long)
    n = min(emb.shape[0], length)
    padded[0, :n], padded_mask[0, :n] = emb[:n].float(), mask[:n].long()
    return {
        "prompt_embed": padded,
        "prompt_attention_mask": padded_mask,
        "pooled_prompt_embed": pooled.float()[None],
    }


def write_jsonl(cfg, out: str | os.PathLike, *, progress: bool = True) -> Path:
    """Write every cached row's raw latent and text features as Pyramid Flow's files next to ``out``
    (``latents/NNNNNN.pt``, ``text/NNNNNN.pt``) and the jsonl ``out`` that lists them with ``video`` and
    ``text``; and ``text/empty.pt``, the empty prompt's features in the same form (frameloom's
    ``data.empty_text_fea``: caption dropout when training from these files without a text encoder). The run
    must be cached (``frameloom cache``) for its current spec."""
    from frameloom import pipeline
    from frameloom.cache.dataset import CachedClipDataset

    from .family import TEXT_MAX_LENGTH, _denoiser_variant

    variant = _denoiser_variant(cfg)
    codec = pipeline.load_codec(cfg, "cpu")
    encoder = pipeline.load_text_encoder(cfg, "cpu")
    manifest = pipeline.manifest_path(cfg)
    data = CachedClipDataset(
        manifest,
        pipeline.clip_spec(cfg),
        codec.identity,
        encoder.identity,
        pipeline.open_store(cfg),
        buckets=pipeline.bucket_policy(cfg),
        caption_rules=pipeline.caption_rules(cfg),
    )
    missing = data.missing()
    if missing:
        raise FrameloomError(
            f"--pyramid-jsonl: {len(missing)} row(s) are not cached yet (run frameloom cache)"
        )
    out = Path(out)
    for sub in ("latents", "text"):
        (out.parent / sub).mkdir(parents=True, exist_ok=True)
    root = manifest.resolve().parent
    length = cfg.model.text_max_length or TEXT_MAX_LENGTH  # upstream pads every caption to a fixed length
    with torch.no_grad():
        emb, mask = encoder.encode([""])
        pooled = encoder.encode_extras([""])["pooled"]
    real = mask[0].bool().cpu()
    torch.save(
        _text_fea(emb[0].float().cpu()[real], real[real], pooled[0].cpu(), length),
        out.parent / "text" / "empty.pt",
    )
    lines = []
    for i in tqdm(range(len(data)), desc="pyramid files", disable=not progress):
        item, row = data[i], data.row(i)
        raw = denormalize_latent(item["latent"][None].float(), variant).to(torch.bfloat16)  # (1, C, T, h, w)
        latent, text_fea = out.parent / "latents" / f"{i:06d}.pt", out.parent / "text" / f"{i:06d}.pt"
        torch.save(raw.clone(), latent)
        torch.save(
            _text_fea(item["text_emb"], item["text_mask"], item["text_extras"]["pooled"], length), text_fea
        )
        video = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
        lines.append(
            {
                "video": str(video),
                "text": str(row.get("text") or ""),
                "latent": str(latent.relative_to(out.parent)),
                "text_fea": str(text_fea.relative_to(out.parent)),
            }
        )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    return out
