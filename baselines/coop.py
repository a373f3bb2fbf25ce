"""The CoOp family under FedAvg: Fed-PosCoOp and Fed-DualCoOp."""
import torch
import torch.nn.functional as F

from baselines.common import class_features, class_prompts, normal_parameter, region_logits
from fedmpt import PromptModel, seeded


class FedPosCoOp(PromptModel):
    """Fed-PosCoOp: PositiveCoOp (Rawlekar et al., 2024, "Rethinking prompting strategies for
    multi-label recognition with partial annotations") under FedAvg. CoOp's learned context
    (M = 16, shared by the classes) makes the positive prompt only; the negative side of each
    class is a learned feature in CLIP's joint space, not a prompt. Regions are pooled as in
    DualCoOp. VOC2007 with ViT-B/16: 16*512 + 20*512 = 18,432 tunable (Table 5: 0.02M)."""
    learning_rate = 3.0  # SGD rate chosen on the offline validation split (the top of its grid)
    n_ctx = 16
    # why --unseen is refused (experiment.validate): the negative feature of a class is learned
    cannot_score_unseen = "its negative side is a learned feature of each class: a class never trained has none"

    def __init__(self, backbone, class_names, conditions=None, cfg=None, *, seed, **_):
        super().__init__()
        self.backbone = backbone
        with seeded(seed):
            self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=1,
                                         ctx_init=getattr(cfg, "ctx_init", ""))
            self.negative = normal_parameter(len(class_names), backbone.width, std=1.0)  # (C, D)

    def text_from(self, encoded):
        positive = class_features(self.prompts, encoded)[0]
        return torch.stack([positive, F.normalize(self.negative, dim=-1)])  # (2, C, D)

    def forward(self, v, P, T=None):
        T = self.text_features() if T is None else T
        return region_logits(F.normalize(P, dim=-1), T)


class FedDualCoOp(FedPosCoOp):
    """Fed-DualCoOp: DualCoOp (Sun et al., NeurIPS 2022) under FedAvg: a learned positive and
    negative context (M = 16 each, shared by the classes) and class-specific region
    aggregation. ViT-B/16: 2*16*512 = 16,384 tunable."""
    learning_rate = 1e-3  # chosen on the offline validation split; the clip sets most steps (docs/choices.md)
    cannot_score_unseen = ""  # both of its contexts are shared by the classes

    def __init__(self, backbone, class_names, conditions=None, cfg=None, *, seed, **_):
        PromptModel.__init__(self)
        self.backbone = backbone
        with seeded(seed):
            self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2,
                                         ctx_init=getattr(cfg, "ctx_init", ""))

    def text_from(self, encoded):
        return class_features(self.prompts, encoded)
