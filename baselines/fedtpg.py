"""FedTPG: a text-driven prompt generator shared by all clients."""
import torch.nn as nn

from baselines.common import class_features, class_prompts, pooled_logits, normal_parameter
from fedmpt import PromptModel, seeded


class FedTPG(PromptModel):
    """FedTPG (Qiu et al., ICLR 2024, "Text-driven prompt generation for vision-language models
    in federated learning"): one prompt generator, shared by all classes and clients, turns the
    class names into the prompt context. Learned queries (M = 4 per sign) pass one transformer
    decoder layer: self-attention among themselves, cross-attention to the frozen text
    features of "a photo of a <class>.", a feed-forward layer. Its output, rescaled to the size
    of CLIP's token embeddings, is the context of the positive and negative prompt; logits come
    from the patch features by DualCoOp's class-specific region aggregation, the paper's federated
    multi-label protocol (`--pooling global`: from the global image feature, as FedTPG
    classifies single-label images). ViT-B/16: 4,208,128 tunable (Table 5: 4.21M).
    Departure: the published generator sees the class names of each client's own task; here
    every client shares the label set, so it sees all of them."""
    learning_rate = 1e-2  # SGD rate chosen on the offline validation split (docs/sweeps.md)
    n_ctx = 4

    def __init__(self, backbone, class_names, conditions=None, cfg=None, *, seed, **_):
        super().__init__()
        self.pooling = cfg.pooling if cfg is not None else "regions"  # the paper's protocol
        self.backbone = backbone
        width = backbone.model.token_embedding.weight.shape[1]  # Dt
        self.register_buffer("names", backbone.encode_texts([f"a photo of a {c}." for c in class_names]),
                             persistent=False)  # (C, D)
        self.register_buffer("token_scale", backbone.model.token_embedding.weight.detach().std(), persistent=False)
        with seeded(seed):
            self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)
            self.prompts.context = None  # generated, not learned
            self.queries = normal_parameter(2 * self.n_ctx, width, std=1.0)
            self.to_width = nn.Identity() if backbone.width == width else nn.Linear(backbone.width, width)
            self.generator = nn.TransformerDecoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0,
                                                        batch_first=True)

    def text_inputs(self):
        context = self.generator(self.queries[None], self.to_width(self.names)[None])[0]  # (2M, Dt)
        context = self.token_scale * context.reshape(2, 1, self.n_ctx, -1)  # (S, K=1, M, Dt)
        return self.prompts(context)

    def text_from(self, encoded):
        return class_features(self.prompts, encoded)

    def forward(self, v, P, T=None):
        T = self.text_features() if T is None else T
        return pooled_logits(v, P, T, self.pooling, self.backbone.logit_scale)
