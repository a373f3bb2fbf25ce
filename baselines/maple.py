"""Fed-MaPLe: MaPLe's coupled deep prompts in both encoders, under FedAvg."""
import torch
import torch.nn as nn

from baselines.common import (class_prompts, encode_class_prompts, pooled_logits, images_as_uint8, images_from_uint8,
                              normal_parameter, vision_width)
from fedmpt import PromptModel, seeded


class FedMaPLe(PromptModel):
    """Fed-MaPLe: MaPLe (Khattak et al., CVPR 2023) under FedAvg. Deep prompts in both encoders:
    M = 2 learned text context tokens in each of the first J = 9 text layers, and in the image
    encoder's first J layers M visual prompt tokens that are a linear coupling function of that
    layer's text prompt. Multi-label: a positive and a negative text context (the visual
    prompts couple to the positive one); logits from the prompted patch features by DualCoOp's
    region aggregation (the paper's protocol; `--pooling global`: from the prompted global
    feature). ViT-B/16: 3,564,288 tunable (Table 5: 3.56M). On a ResNet tower only the first
    layer's visual prompt exists; it joins the attention pool."""
    learning_rate = 3e-3  # SGD rate chosen on the offline validation split (docs/sweeps.md)
    n_ctx, depth, inputs_start_with_v = 2, 9, False

    def __init__(self, backbone, class_names, conditions=None, cfg=None, *, seed, **_):
        super().__init__()
        self.pooling = cfg.pooling if cfg is not None else "regions"  # the paper's protocol
        self.backbone = backbone
        self.input_kind = "images" if backbone.is_vit else "grid"  # what encode_images returns
        text_layers = len(backbone.model.transformer.resblocks)
        layers = min(text_layers, len(backbone.model.visual.transformer.resblocks)) if backbone.is_vit else text_layers
        self.J = min(self.depth, layers)
        width = backbone.model.token_embedding.weight.shape[1]
        with seeded(seed):
            self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)  # layer 0 (2, 1, M, Dt)
            self.deep_text = normal_parameter(self.J - 1, 2, self.n_ctx, width)  # layers 1 .. J-1
            self.couple = nn.ModuleList(nn.Linear(width, vision_width(backbone))
                                        for _ in range(self.J if backbone.is_vit else 1))

    def encode_images(self, images):
        """ViT: the images themselves as uint8 pixels; ResNet: the last grid."""
        return (images_as_uint8(images),) if self.backbone.is_vit else (self.backbone.resnet_grid(images),)

    def text_features(self):
        C, M = self.prompts.shape[1], self.n_ctx

        def deep(i, x):  # after text block i, the prompt of block i+1 replaces tokens 1 .. M
            if i + 1 < self.J:
                prompt = self.deep_text[i][:, None].expand(-1, C, -1, -1).flatten(0, 1)  # (2C, M, Dt)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + M:]], dim=1)
            return x
        return encode_class_prompts(self.backbone, self.prompts, after=deep)

    def image_features(self, x):
        text = [self.prompts.context[0, 0]] + [layer[0] for layer in self.deep_text]  # positive sign
        visual = [couple(t)[None] for couple, t in zip(self.couple, text)]  # each (1, M, W)
        def deep(i, tokens):  # after image block i, the prompt of block i+1 replaces the last M
            if i + 1 < len(visual):
                tokens = torch.cat([tokens[:, :-self.n_ctx], visual[i + 1].expand(len(tokens), -1, -1)], dim=1)
            return tokens
        with self.backbone.autocast():  # the frozen encoder at the run's precision; (v, P) float32
            if not self.backbone.is_vit:
                return tuple(f.float() for f in self.backbone.resnet_head(x, visual[0]))
            tokens = self.backbone.vit_tokens(images_from_uint8(x), visual[0])
            blocks = self.backbone.model.visual.transformer.resblocks
            return tuple(f.float() for f in self.backbone.vit_head(self.backbone.run_blocks(blocks, tokens, deep)))

    def forward(self, x, T=None):
        T = self.text_features() if T is None else T
        return pooled_logits(*self.image_features(x), T, self.pooling, self.backbone.logit_scale)
