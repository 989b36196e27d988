"""CogVideoX's text encoding: T5 over a fixed ``max_text_seq_length`` (226) tokens, no attention mask.

CogVideoX's transformer was trained on (and its pipeline feeds) the T5 output of the caption padded to
exactly ``max_text_seq_length`` tokens, with the encoder run *without* an attention mask, so the padded
positions carry real (non-zero) values that the denoiser attends to. frameloom's generic ``T5TextEncoder``
pads per batch and zeroes padding; this variant reproduces the pipeline's ``_get_t5_prompt_embeds`` instead.
The returned mask is all True (every one of the 226 positions is a token the transformer sees), so the cache
stores all of them and batches need no padding.
"""

from __future__ import annotations

import hashlib
import json

import torch

from frameloom.models.text import T5TextEncoder

__all__ = ["CogVideoXT5Encoder"]


class CogVideoXT5Encoder(T5TextEncoder):
    """``T5TextEncoder`` with CogVideoX's fixed-length, unmasked encoding (module docstring)."""

    def __init__(self, model, tokenizer, max_length: int = 226):
        super().__init__(model, tokenizer, max_length=max_length)
        # Another encoding mode gives other embeddings for the same weights: it must be part of the identity.
        spec = json.dumps({"base": self.identity, "mode": "cogvideox-fixed-length-unmasked"}, sort_keys=True)
        self.identity = hashlib.sha256(spec.encode()).hexdigest()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # (B, max_length)
        emb = self.model(input_ids=ids).last_hidden_state  # (B, max_length, dim): no mask, as the pipeline
        mask = torch.ones(ids.shape, dtype=torch.bool, device=self.device)
        return emb, mask
