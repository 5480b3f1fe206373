"""Sampling: samplers, seeds, latents, the denoising loop, img2img, hires fix."""
