"""The tiny run every training/sampling test builds on: 8x8 pixels, 4 frames, a 2-layer 32-dim tiny T5."""

TINY = [
    "data.num_frames=4",
    "data.height=8",
    "data.width=8",
    "model.text_encoder=tiny-byt5",
    "model.text_max_length=16",
    "model.config={patch_size: [1, 4, 4], hidden_size: 32, depth: 2, num_heads: 2}",
    "train.batch_size=4",
    "train.progress=false",
    "logging.tensorboard=false",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "optim.schedule=constant",  # a cosine schedule depends on train.steps, which the resume tests change
    "checkpoint.every=3",
    "checkpoint.keep_last=0",
    "sample.steps=2",
]
