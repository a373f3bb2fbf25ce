"""What the comparison methods share: CoOp-style class prompts, region and global logits,
normal initial values, images kept as uint8 pixels."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from backbone import FrozenCLIP
from data import CLIP_MEAN, CLIP_STD
from prompts import ConditionPrompts

_MEAN, _STD = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]


def images_as_uint8(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images (B, 3, H, W) back to their uint8 pixels, exactly: CLIP's
    preprocessing normalises k / 255. Half the store of float16 images."""
    mean, std = _MEAN.to(images.device), _STD.to(images.device)
    return ((images * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def images_from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or their float values) pixels (B, 3, H, W) -> CLIP-normalised float32 images."""
    mean, std = _MEAN.to(pixels.device), _STD.to(pixels.device)
    return (pixels.float() / 255 - mean) / std


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


def normal_parameter(*shape, std=0.02):
    """N(0, std^2) values from torch's generator: a model draws them inside fedmpt.seeded(seed)."""
    return nn.Parameter(std * torch.randn(*shape))


def vision_width(backbone: FrozenCLIP) -> int:
    """Width of the tokens a visual prompt joins: ViT tokens, or the ResNet attention pool's input."""
    visual = backbone.model.visual
    return visual.conv1.out_channels if backbone.is_vit else visual.attnpool.k_proj.in_features
