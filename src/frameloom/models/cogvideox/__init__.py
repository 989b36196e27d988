"""The CogVideoX family (1.0 and 1.5, text-to-video and image-to-video) on diffusers' model classes."""
