"""What the comparison methods share: CoOp-style class prompts, region and global logits,
seeded initial values."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from backbone import FrozenCLIP
from prompts import ConditionPrompts


def class_prompts(backbone: FrozenCLIP, class_names, n_ctx, signs=2) -> ConditionPrompts:
    """CoOp's prompts 'ctx_1 .. ctx_M <class>.', one learned context per sign shared by all
    classes (signs=2: DualCoOp's positive and negative prompt)."""
    return ConditionPrompts(class_names, [""], n_ctx, backbone.model.token_embedding,
                            backbone.context_length, clip.tokenize, signs=signs)


def encode_class_prompts(backbone: FrozenCLIP, prompts, context=None, after=None) -> torch.Tensor:
    """Normalised text features (S, C, D) of class prompts."""
    embeddings, eot = prompts(context)
    T = F.normalize(backbone.encode_prompts(embeddings, eot, after), dim=-1)
    return T.reshape(prompts.signs, prompts.shape[1], -1)


def region_logits(P, T, scale, weights=None):
    """DualCoOp's class-specific region aggregation. P (B, N, D) normalised patch features,
    T (2, C, D) positive and negative text features. Each region votes tau (s+ - s-); the votes
    are pooled with weights softmax_n(tau s+) per class, or with `weights` (B, C, N)."""
    S = torch.einsum("bnd,scd->bscn", P, T)  # (B, 2, C, N)
    weights = (scale * S[:, 0]).softmax(dim=-1) if weights is None else weights
    return scale * ((S[:, 0] - S[:, 1]) * weights).sum(dim=-1)


def global_logits(v, T, scale):
    """logit[c] = tau (cos(v, T+[c]) - cos(v, T-[c])) from global features v (B, D)."""
    v = F.normalize(v, dim=-1)
    return scale * (v @ T[0].T - v @ T[1].T)


def seeded_normal(*shape, std=0.02, seed=0):
    return nn.Parameter(std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def vision_width(backbone: FrozenCLIP) -> int:
    """Width of the tokens a visual prompt joins: ViT tokens, or the ResNet attention pool's input."""
    visual = backbone.model.visual
    return visual.conv1.out_channels if backbone.is_vit else visual.attnpool.k_proj.in_features
