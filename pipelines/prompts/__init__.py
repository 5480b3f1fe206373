"""Prompts: A1111 prompt syntax, encoding to conditioning, embeddings, styles."""
