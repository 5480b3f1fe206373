"""Benchmarks that print figures (not tests): engine, upscaler and API overhead."""
