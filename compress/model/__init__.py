"""The ViT itself: the canonical model (vit), checkpoints and the importers of other layouts, MAC counting."""
