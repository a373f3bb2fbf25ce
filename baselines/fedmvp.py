"""FedMVP, the seed baseline: a PromptFormer turns class attribute descriptions into visual
prompts. Its attribute descriptions: baselines/attributes/<dataset>.json (`load_attributes`)."""
import json
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from baselines.common import (class_features, class_prompts, pooled_logits, images_as_uint8, images_from_uint8,
                              normal_parameter, vision_width)
from data import prompt_name
from errors import FedMPTError
from fedmpt import PromptModel, seeded

ATTRIBUTES_DIR = Path(__file__).resolve().parent / "attributes"


def load_attributes(dataset: str, class_names, spec: str = "") -> dict:
    """FedMVP's class attribute descriptions: {class: [sentence, ...]} from
    baselines/attributes/<dataset>.json (or `spec`), else three template sentences per class."""
    path = Path(spec) if spec else ATTRIBUTES_DIR / f"{dataset}.json"
    if not spec and not path.exists():
        templates = ["a photo of a {}.", "a {} in its usual surroundings.", "a close-up of a {}."]
        return {"source": "template",
                "attributes": {c: [t.format(prompt_name(c)) for t in templates] for c in class_names}}
    try:
        content = json.loads(path.read_text())
        attributes = content["attributes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise FedMPTError(f"cannot read attribute file {path} ({error!r}); it must hold "
                          '{"attributes": {"<class>": ["<sentence>", ...]}}.') from None
    missing = [c for c in class_names if not (isinstance(attributes.get(c), list) and attributes[c]
                                              and all(isinstance(t, str) and t.strip() for t in attributes[c]))]
    if missing:
        raise FedMPTError(f"attribute file {path}: no descriptions (a non-empty list of sentences) "
                          f"for {', '.join(missing)}; FedMVP needs them for every class it scores (unseen ones "
                          "too): `python -m conditions.discover --attributes --dataset NAME --out FILE` writes "
                          "them (docs/conditions.md), --attributes FILE reads them.")
    return {"source": content.get("source", "unknown"), "file": str(path),
            "attributes": {c: attributes[c] for c in class_names}}


class FedMVP(PromptModel):
    """FedMVP (arXiv 2504.20860), the seed baseline. PromptFormer: queries are the frozen global
    image feature plus M = 4 learned offsets; keys and values are the frozen text features of
    LLM-style class attribute descriptions (baselines/attributes/<dataset>.json); one cross-attention and
    a LayerNorm, then a bottleneck (D -> 64 -> W) makes M visual prompt tokens that enter the
    frozen image encoder at its input (ResNet: the attention pool). The text side is DualCoOp's
    two contexts; logits from the prompted patch features by DualCoOp's region aggregation (the
    paper's protocol; `--pooling global`: the prompted global feature). Loss: the classification
    loss on the prompted features plus a consistency loss keeping them near the frozen ones,
    1 - cos(v', v). ViT-B/16: 1,152,832 tunable
    (Table 5: 1.14M). Departures: the text side learns contexts (multi-label needs a negative
    side); one PromptFormer layer."""
    learning_rate = 1e-3  # chosen on the offline validation split; the clip sets most steps (docs/choices.md)
    n_queries, bottleneck, n_ctx, consistency = 4, 64, 16, 1.0

    def __init__(self, backbone, class_names, conditions=None, cfg=None, attributes=(), *, seed, **_):
        super().__init__()
        self.pooling = cfg.pooling if cfg is not None else "regions"  # the paper's protocol
        if not attributes:
            raise FedMPTError("FedMVP needs class attribute descriptions (baselines/attributes/<dataset>.json or --attributes).")
        self.backbone = backbone
        self.input_kind = "v,images" if backbone.is_vit else "v,grid"  # what encode_images returns
        D = backbone.width
        self.register_buffer("attributes", backbone.encode_texts(list(attributes)), persistent=False)  # (A, D)
        with seeded(seed):
            self.queries = normal_parameter(self.n_queries, D)
            self.attention = nn.MultiheadAttention(D, max(1, D // 64), batch_first=True)
            self.norm = nn.LayerNorm(D)
            self.down, self.up = nn.Linear(D, self.bottleneck), nn.Linear(self.bottleneck, vision_width(backbone))
            self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)

    def encode_images(self, images):
        """(frozen v, the images as uint8 pixels) for a ViT; (frozen v, the last grid) for a ResNet."""
        if self.backbone.is_vit:
            return self.backbone.encode_image_tokens(images)[0], images_as_uint8(images)
        grid = self.backbone.resnet_grid(images)
        return self.backbone.resnet_head(grid)[0], grid

    def text_from(self, encoded):
        return class_features(self.prompts, encoded)

    def image_features(self, v, x):
        """The prompted image features: global v' (B, D) and patches P' (B, N, D)."""
        queries = F.normalize(v, dim=-1)[:, None] + self.queries  # (B, M, D)
        keys = self.attributes.expand(len(v), -1, -1)  # (B, A, D)
        attended = self.norm(queries + self.attention(queries, keys, keys, need_weights=False)[0])
        prompts = self.up(F.gelu(self.down(attended)))  # (B, M, W)
        with self.backbone.autocast():  # the frozen encoder at the run's precision; (v', P') float32
            if not self.backbone.is_vit:
                return tuple(f.float() for f in self.backbone.resnet_head(x, prompts))
            tokens = self.backbone.vit_tokens(images_from_uint8(x), prompts)
            blocks = self.backbone.model.visual.transformer.resblocks
            return tuple(f.float() for f in self.backbone.vit_head(self.backbone.run_blocks(blocks, tokens)))

    def forward(self, v, x, T=None):
        T = self.text_features() if T is None else T
        return pooled_logits(*self.image_features(v, x), T, self.pooling, self.backbone.logit_scale)

    def loss(self, inputs, targets, loss_fn, T=None):
        v, x = inputs
        prompted, patches = self.image_features(v, x)
        T = self.text_features() if T is None else T
        logits = pooled_logits(prompted, patches, T, self.pooling, self.backbone.logit_scale)
        drift = 1 - F.cosine_similarity(prompted, v, dim=-1)
        return loss_fn(logits, targets) + self.consistency * drift.mean()
