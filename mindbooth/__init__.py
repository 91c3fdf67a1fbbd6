"""MindBooth's training and tooling library: what the scripts share (no CLI here; the scripts parse flags)."""
