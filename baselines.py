"""The paper's comparison methods under one protocol: `python federate.py --method M`.

Each method is a `fedmpt.PromptModel`: the same frozen CLIP, data, client split, FedAvg loop
and metrics as FedMPT, and FedAvg exchanges exactly its own tunable tensors. Multi-label output
is the same for all: a positive and a negative text side per class and

    logit[c] = tau * (s+[c] - s-[c]),   tau = CLIP's logit scale,

so sigmoid(logit) is DualCoOp's two-way softmax. Sizes are each paper's published defaults;
with CLIP ViT-B/16 on VOC2007 the tunable counts land within 10% of the FedMPT paper's Table 5
(`python federate.py --method M --clip ViT-B/16 --random-init --count-params`, tested).

Inputs: methods that change only the text side or act after the encoders (Fed-PosCoOp,
Fed-DualCoOp, FedTPG) use the cached frozen features (v, P), like FedMPT. Methods that prompt or
adapt inside the image encoder (Fed-MaPLe, FedMVP, Fed-RAM) cache the encoder's input at the
first layer they change and run the rest at every step, so their cost is real. A ResNet tower
has no transformer layers: there visual prompts join the attention pool's keys and values, and
adapters act on the last stage's grid.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import ot
from errors import FedMPTError
from fedmpt import FedMPT, FrozenCLIP, ModelConfig, PromptModel
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


class FedPosCoOp(PromptModel):
    """Fed-PosCoOp: PositiveCoOp (Rawlekar et al., 2024, "Rethinking prompting strategies for
    multi-label recognition with partial annotations") under FedAvg. CoOp's learned context
    (M = 16, shared by the classes) makes the positive prompt only; the negative side of each
    class is a learned feature in CLIP's joint space, not a prompt. Regions are pooled as in
    DualCoOp. VOC2007 with ViT-B/16: 16*512 + 20*512 = 18,432 tunable (Table 5: 0.02M)."""
    n_ctx = 16

    def __init__(self, backbone, class_names, conditions=None, cfg=None, **_):
        super().__init__()
        self.backbone = backbone
        self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=1)
        self.negative = seeded_normal(len(class_names), backbone.width, std=1.0, seed=1)  # (C, D)

    def text_features(self):
        positive = encode_class_prompts(self.backbone, self.prompts)[0]
        return torch.stack([positive, F.normalize(self.negative, dim=-1)])  # (2, C, D)

    def forward(self, v, P, T=None):
        T = self.text_features() if T is None else T
        return region_logits(F.normalize(P, dim=-1), T, self.backbone.logit_scale)


class FedDualCoOp(FedPosCoOp):
    """Fed-DualCoOp: DualCoOp (Sun et al., NeurIPS 2022) under FedAvg: a learned positive and
    negative context (M = 16 each, shared by the classes) and class-specific region
    aggregation. ViT-B/16: 2*16*512 = 16,384 tunable."""

    def __init__(self, backbone, class_names, conditions=None, cfg=None, **_):
        PromptModel.__init__(self)
        self.backbone = backbone
        self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)

    def text_features(self):
        return encode_class_prompts(self.backbone, self.prompts)


class FedTPG(PromptModel):
    """FedTPG (Qiu et al., ICLR 2024, "Text-driven prompt generation for vision-language models
    in federated learning"): one prompt generator, shared by all classes and clients, turns the
    class names into the prompt context. Learned queries (M = 4 per sign) pass one transformer
    decoder layer: self-attention among themselves, cross-attention to the frozen text
    features of "a photo of a <class>.", a feed-forward layer. Its output, rescaled to the size
    of CLIP's token embeddings, is the context of the positive and negative prompt; logits come
    from the global image feature. ViT-B/16: 4,208,128 tunable (Table 5: 4.21M).
    Departure: the published generator sees the class names of each client's own task; here
    every client shares the label set, so it sees all of them."""
    n_ctx = 4

    def __init__(self, backbone, class_names, conditions=None, cfg=None, **_):
        super().__init__()
        self.backbone = backbone
        width = backbone.model.token_embedding.weight.shape[1]  # Dt
        self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)
        self.prompts.context = None  # generated, not learned
        self.register_buffer("names", backbone.encode_texts([f"a photo of a {c}." for c in class_names]),
                             persistent=False)  # (C, D)
        self.register_buffer("token_scale", backbone.model.token_embedding.weight.detach().std(), persistent=False)
        self.queries = seeded_normal(2 * self.n_ctx, width, std=1.0)
        self.to_width = nn.Identity() if backbone.width == width else nn.Linear(backbone.width, width)
        self.generator = nn.TransformerDecoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0,
                                                    batch_first=True)

    def text_features(self):
        context = self.generator(self.queries[None], self.to_width(self.names)[None])[0]  # (2M, Dt)
        context = self.token_scale * context.reshape(2, 1, self.n_ctx, -1)  # (S, K=1, M, Dt)
        return encode_class_prompts(self.backbone, self.prompts, context)

    def forward(self, v, P, T=None):
        T = self.text_features() if T is None else T
        return global_logits(v, T, self.backbone.logit_scale)


class FedMaPLe(PromptModel):
    """Fed-MaPLe: MaPLe (Khattak et al., CVPR 2023) under FedAvg. Deep prompts in both encoders:
    M = 2 learned text context tokens in each of the first J = 9 text layers, and in the image
    encoder's first J layers M visual prompt tokens that are a linear coupling function of that
    layer's text prompt. Multi-label: a positive and a negative text context (the visual
    prompts couple to the positive one); logits from the prompted global feature. ViT-B/16:
    3,564,288 tunable (Table 5: 3.56M). On a ResNet tower only the first layer's visual prompt
    exists; it joins the attention pool."""
    n_ctx, depth, inputs_start_with_v = 2, 9, False

    def __init__(self, backbone, class_names, conditions=None, cfg=None, **_):
        super().__init__()
        self.backbone = backbone
        text_layers = len(backbone.model.transformer.resblocks)
        layers = min(text_layers, len(backbone.model.visual.transformer.resblocks)) if backbone.is_vit else text_layers
        self.J = min(self.depth, layers)
        width = backbone.model.token_embedding.weight.shape[1]
        self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)  # layer 0 (2, 1, M, Dt)
        self.deep_text = seeded_normal(self.J - 1, 2, self.n_ctx, width, seed=2)  # layers 1 .. J-1
        self.couple = nn.ModuleList(nn.Linear(width, vision_width(backbone))
                                    for _ in range(self.J if backbone.is_vit else 1))

    def encode_images(self, images):
        """ViT: the images themselves (float16, to halve the cache); ResNet: the last grid."""
        return (images.half(),) if self.backbone.is_vit else (self.backbone.resnet_grid(images),)

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
        if not self.backbone.is_vit:
            return self.backbone.resnet_head(x, visual[0])[0]

        def deep(i, tokens):  # after image block i, the prompt of block i+1 replaces the last M
            if i + 1 < len(visual):
                tokens = torch.cat([tokens[:, :-self.n_ctx], visual[i + 1].expand(len(tokens), -1, -1)], dim=1)
            return tokens
        tokens = self.backbone.vit_tokens(x.float(), visual[0])
        blocks = self.backbone.model.visual.transformer.resblocks
        return self.backbone.vit_head(self.backbone.run_blocks(blocks, tokens, deep))[0]

    def forward(self, x, T=None):
        T = self.text_features() if T is None else T
        return global_logits(self.image_features(x), T, self.backbone.logit_scale)


class FedMVP(PromptModel):
    """FedMVP (arXiv 2504.20860), the seed baseline. PromptFormer: queries are the frozen global
    image feature plus M = 4 learned offsets; keys and values are the frozen text features of
    LLM-style class attribute descriptions (attributes/<dataset>.json); one cross-attention and
    a LayerNorm, then a bottleneck (D -> 64 -> W) makes M visual prompt tokens that enter the
    frozen image encoder at its input (ResNet: the attention pool). The text side is DualCoOp's
    two contexts. Loss: the classification loss on the prompted features plus a consistency
    loss keeping them near the frozen ones, 1 - cos(v', v). ViT-B/16: 1,152,832 tunable
    (Table 5: 1.14M). Departures: the text side learns contexts (multi-label needs a negative
    side); one PromptFormer layer."""
    n_queries, bottleneck, n_ctx, consistency = 4, 64, 16, 1.0

    def __init__(self, backbone, class_names, conditions=None, cfg=None, attributes=(), **_):
        super().__init__()
        if not attributes:
            raise FedMPTError("FedMVP needs class attribute descriptions (attributes/<dataset>.json or --attributes).")
        self.backbone = backbone
        D = backbone.width
        self.register_buffer("attributes", backbone.encode_texts(list(attributes)), persistent=False)  # (A, D)
        self.queries = seeded_normal(self.n_queries, D, seed=3)
        self.attention = nn.MultiheadAttention(D, max(1, D // 64), batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.down, self.up = nn.Linear(D, self.bottleneck), nn.Linear(self.bottleneck, vision_width(backbone))
        self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)

    def encode_images(self, images):
        """(frozen v, the images in float16) for a ViT; (frozen v, the last grid) for a ResNet."""
        if self.backbone.is_vit:
            return self.backbone.encode_image_tokens(images)[0], images.half()
        grid = self.backbone.resnet_grid(images)
        return self.backbone.resnet_head(grid)[0], grid

    def text_features(self):
        return encode_class_prompts(self.backbone, self.prompts)

    def image_features(self, v, x):
        """The prompted global feature v' (B, D)."""
        queries = F.normalize(v, dim=-1)[:, None] + self.queries  # (B, M, D)
        keys = self.attributes.expand(len(v), -1, -1)  # (B, A, D)
        attended = self.norm(queries + self.attention(queries, keys, keys, need_weights=False)[0])
        prompts = self.up(F.gelu(self.down(attended)))  # (B, M, W)
        if not self.backbone.is_vit:
            return self.backbone.resnet_head(x, prompts)[0]
        tokens = self.backbone.vit_tokens(x.float(), prompts)
        return self.backbone.vit_head(self.backbone.run_blocks(self.backbone.model.visual.transformer.resblocks, tokens))[0]

    def forward(self, v, x, T=None):
        T = self.text_features() if T is None else T
        return global_logits(self.image_features(v, x), T, self.backbone.logit_scale)

    def loss(self, inputs, targets, loss_fn):
        v, x = inputs
        prompted = self.image_features(v, x)
        logits = global_logits(prompted, self.text_features(), self.backbone.logit_scale)
        drift = 1 - F.cosine_similarity(prompted, v, dim=-1)
        return loss_fn(logits, targets) + self.consistency * drift.sum()


class LocalAdapter(nn.Module):
    """RAM's local adapter on patch tokens: x + Up(GELU(Conv3x3(GELU(Down(x))))) over the patch
    grid, so each token mixes with its neighbours. Up starts at zero (the adapter starts as the
    identity)."""

    def __init__(self, width, hidden):
        super().__init__()
        self.down, self.up = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):  # (B, N, W), N a square grid
        B, N, _ = x.shape
        side = int(round(N ** 0.5))
        h = F.gelu(self.down(x)).transpose(1, 2).reshape(B, -1, side, side)
        return x + self.up(F.gelu(self.conv(h).flatten(2).transpose(1, 2)))


class TextAdapter(nn.Module):
    """Residual MLP on every text token, x + Up(GELU(Down(x))), Up starting at zero."""

    def __init__(self, width, hidden):
        super().__init__()
        self.down, self.up = nn.Linear(width, hidden), nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(F.gelu(self.down(x)))


class FedRAM(PromptModel):
    """Fed-RAM: RAM (Tan et al., CVPR 2025, "Recover and Match: open-vocabulary multi-label
    recognition through knowledge-constrained optimal transport") under FedAvg. Local adapters
    (W -> D, 3x3 convolution over the patch grid, D -> W) after each of the last 3 image layers
    recover regional semantics; residual MLP adapters (Dt -> 2Dt -> Dt) after the last 3 text
    layers; DualCoOp's two learned contexts. Patches are matched to classes by entropic optimal
    transport (ot.py: rows 1/N, columns 1/C); the plan, per class, weighs the regions' votes.
    ViT-B/16: 12,609,280 tunable (Table 5: 13.02M). Departures: the transport is balanced and
    its knowledge constraint (frozen CLIP's prior on the marginals) is left out; the shared
    ASL replaces RAM's multi-matching loss. On a ResNet tower one local adapter acts on the
    last stage's grid."""
    depth, n_ctx, ot_eps, inputs_start_with_v = 3, 16, 0.1, False

    def __init__(self, backbone, class_names, conditions=None, cfg=None, **_):
        super().__init__()
        self.backbone = backbone
        model, W = backbone.model, vision_width(backbone)
        self.n_image = min(self.depth, len(model.visual.transformer.resblocks)) if backbone.is_vit else 1
        self.n_text = min(self.depth, len(model.transformer.resblocks))
        width = model.token_embedding.weight.shape[1]
        self.local = nn.ModuleList(LocalAdapter(W, backbone.width) for _ in range(self.n_image))
        self.text_adapters = nn.ModuleList(TextAdapter(width, 2 * width) for _ in range(self.n_text))
        self.prompts = class_prompts(backbone, class_names, self.n_ctx, signs=2)

    def encode_images(self, images):
        """ViT: the tokens entering the first adapted layer (float16); ResNet: the last grid."""
        if not self.backbone.is_vit:
            return (self.backbone.resnet_grid(images),)
        blocks = self.backbone.model.visual.transformer.resblocks
        return (self.backbone.run_blocks(blocks[:len(blocks) - self.n_image], self.backbone.vit_tokens(images)).half(),)

    def text_features(self):
        first = len(self.backbone.model.transformer.resblocks) - self.n_text
        adapt = lambda i, x: self.text_adapters[i - first](x) if i >= first else x
        return encode_class_prompts(self.backbone, self.prompts, after=adapt)

    def image_features(self, x):
        if not self.backbone.is_vit:
            B, W, h, w = x.shape
            grid = self.local[0](x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, W, h, w)
            return self.backbone.resnet_head(grid)
        adapt = lambda i, t: torch.cat([t[:, :1], self.local[i](t[:, 1:])], dim=1)
        blocks = self.backbone.model.visual.transformer.resblocks
        return self.backbone.vit_head(self.backbone.run_blocks(blocks[len(blocks) - self.n_image:], x.float(), adapt))

    def forward(self, x, T=None):
        T = self.text_features() if T is None else T
        _, P = self.image_features(x)
        P = F.normalize(P, dim=-1)
        S = torch.einsum("bnd,cd->bnc", P, T[0])  # (B, N, C) positive cosines
        Q = ot.sinkhorn(1 - S.detach(), self.ot_eps)  # rows 1/N, columns 1/C; detached as in FedMPT
        weights = Q.transpose(1, 2) * Q.shape[-1]  # (B, C, N), each class's weights sum to 1
        return region_logits(P, T, self.backbone.logit_scale, weights)


METHODS = {"fedmpt": FedMPT, "fedmvp": FedMVP, "fed-dualcoop": FedDualCoOp, "fed-poscoop": FedPosCoOp,
           "fedtpg": FedTPG, "fed-maple": FedMaPLe, "fed-ram": FedRAM}


def build(method: str, backbone: FrozenCLIP, class_names, conditions, cfg: ModelConfig, attributes=()):
    """The model of `method` on a frozen backbone (FedMPT takes the conditions, FedMVP the
    attribute descriptions)."""
    if method == "fedmpt":
        return FedMPT(backbone, class_names, conditions, cfg)
    return METHODS[method](backbone, class_names, conditions, cfg, attributes=attributes)
