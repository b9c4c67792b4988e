"""Token reduction for ViTs: ToMe and PiToMe merging, EViT pruning and a lower working resolution, as plans
(``plan``), tensor math (``merge``) and the model patch that applies them (``patch``)."""

from compress.tokens.merge import class_attention, merge_tokens, pitome_merge, prune_tokens
from compress.tokens.patch import ReducedVisionTransformer, apply, forward_reduced
from compress.tokens.plan import (MERGING, METHODS, TokenError, TokenReduction, check_model, default_evit_layers,
                                  evit, layers_at, max_constant_r, pitome, resolution, resolution_sizes, token_counts,
                                  tome)

__all__ = ["MERGING", "METHODS", "ReducedVisionTransformer", "TokenError", "TokenReduction", "apply", "check_model",
           "class_attention", "default_evit_layers", "evit", "forward_reduced", "layers_at", "max_constant_r",
           "merge_tokens", "pitome", "pitome_merge", "prune_tokens", "resolution", "resolution_sizes", "token_counts",
           "tome"]
