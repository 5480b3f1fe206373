"""Plug-in registries: always-on and selectable scripts, extra-network tag handlers."""
