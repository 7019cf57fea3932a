"""Pretrained weights without torch: reading `.pth` files (`pth`) and fetching them once
with a checked sha256 (`fetch`). Used by `cm` (LPIPS) and `evaluation` (Inception)."""
