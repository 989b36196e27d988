"""frameloom: train and fine-tune text-to-video diffusion transformers on your own videos."""

__version__ = "0.1.0"
