"""Model files: what exists, identification, safe reading, loading, devices."""
