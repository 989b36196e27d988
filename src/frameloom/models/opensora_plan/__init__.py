"""Open-Sora-Plan v1.3 (PKU-YuanGroup/Open-Sora-Plan): its Skiparse DiT, WF-VAE, mT5 text encoder, DDPM recipe
and samplers, loading and writing the released weights (docs/opensora_plan.md)."""
