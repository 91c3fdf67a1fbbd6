"""MindBooth: SDXL in MindSpore (sgm-style `gm` package)."""
