"""Data foundations: sources, the on-disk layout and the torch dataset."""
