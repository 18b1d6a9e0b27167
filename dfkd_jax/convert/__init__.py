"""Import PyTorch teachers exactly (and export students back), without torch."""
