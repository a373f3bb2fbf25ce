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


def class_prompts(backbone: FrozenCLIP, class_names, n_ctx, signs=2, ctx_init="") -> ConditionPrompts:
    """CoOp's prompts 'ctx_1 .. ctx_M <class>.', one learned context per sign shared by all
    classes (signs=2: DualCoOp's positive and negative prompt); `ctx_init`: CoOp's template for
    the last positive contexts (--ctx-init)."""
    return ConditionPrompts(class_names, [""], n_ctx, backbone.model.token_embedding,
                            backbone.context_length, clip.tokenize, signs=signs, ctx_init=ctx_init)


def encode_class_prompts(backbone: FrozenCLIP, prompts, context=None, after=None) -> torch.Tensor:
    """Normalised text features (S, C, D) of class prompts."""
    return class_features(prompts, backbone.encode_prompts(*prompts(context), after))


def class_features(prompts, encoded) -> torch.Tensor:
    """The text encoder's output (S*C, D) for class prompts -> normalised features (S, C, D)."""
    return F.normalize(encoded, dim=-1).reshape(prompts.signs, prompts.shape[1], -1)


POOL_TEMPERATURE, POOL_SCALE = 20.0, 5.0  # DualCoOp's code: 20 x cosine, softmax over regions, x 5


def region_logits(P, T, weights=None, scale=POOL_TEMPERATURE * POOL_SCALE):
    """DualCoOp's class-specific region aggregation. P (B, N, D) normalised patch features,
    T (2, C, D) positive and negative text features, s+- their cosines per region n. Each class
    weighs its regions by w_n = softmax_n(20 s+_n) and the logit is 5 sum_n w_n 20 (s+_n - s-_n),
    as DualCoOp's code does (a softmax at CLIP's 100 would be close to max-pooling). Fed-RAM
    passes its own `weights` (B, C, N) and scale."""
    S = torch.einsum("bnd,scd->bscn", P, T)  # (B, 2, C, N)
    weights = (POOL_TEMPERATURE * S[:, 0]).softmax(dim=-1) if weights is None else weights
    return scale * ((S[:, 0] - S[:, 1]) * weights).sum(dim=-1)


def pooled_logits(v, P, T, pooling, scale):
    """The paper's protocol for the single-label methods in multi-label federated learning:
    class-specific region aggregation of the patch features P ("regions"); "global": from the
    global feature v alone, tau (cos(v, T+) - cos(v, T-))."""
    return region_logits(F.normalize(P, dim=-1), T) if pooling == "regions" else global_logits(v, T, scale)


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
