"""FedMPT: federated multi-label prompt tuning of a frozen CLIP through conditions.

For an image with global feature v (D,) and patch features P (N, D), class c and sign s:

    T^s[k, c]   = TextAdapter(CLIP_text(ctx^s_k, "<condition k> <class c>."))      (2, K, C, D)
    S[n, k]     = cos(PatchAdapter(P)[n], T^s[k, c])                                 (N, K)
    Q           = Sinkhorn(cost = 1 - S, eps)   columns sum to 1/K; rows ~1/N          (N, K)
    z^s[c, k]   = K * sum_n Q[n, k] S[n, k]      condition score (a transported cosine)
    g           = softmax(MLP(v))                gate over conditions              (K,)
    logit[c]    = tau * sum_k g[k] (z^+[c, k] - z^-[c, k]),   tau = CLIP's logit scale

sigmoid(logit) is DualCoOp's two-way softmax over the positive and negative prompt. The row
(region) marginal is a penalty rho KL(Q 1 | 1/N) rather than a constraint (`--ot-rho`, default
0.1 = eps; 0 gives the specification's exact marginal). With an exact marginal every region must
be transported, so with few objects most conditions are forced onto background and z is close to
a mean over regions; on the shapes world that cost 8 mAP (README, bias study). CLIP stays
frozen; the contexts, the two adapters and the gate are all that trains and travels
(`FedMPT.tunable_state`). Adapters sit after the frozen encoders, so an image's frozen features
(v, P) never change and are computed once (`FrozenCLIP.encode_image_tokens`).
"""
import hashlib
import os
import socket
import warnings
from dataclasses import dataclass

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised inside clip
import clip  # noqa: E402
import torch
import torch.nn as nn
import torch.nn.functional as F

import ot
from errors import FedMPTError
from gating import ConditionGate
from prompts import ConditionPrompts

# (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#  context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
ARCHITECTURES = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    # The offline default: 64 px, 8 px patches -> N = 64 regions, seeded random weights.
    "tiny": (128, 64, 2, 128, 8, 32, 49408, 128, 2, 2),
    # The offline default, pretrained on the shapes world (pretrain.py): ResNet tower at 96 px
    # -> a 3 x 3 grid, N = 9 regions.
    "shapes": (128, 96, (1, 1, 1, 1), 16, None, 48, 49408, 128, 4, 2),
}


def load_clip(name: str, weights: str = None, random_init: bool = False, seed: int = 0,
              cache_dir: str = None) -> nn.Module:
    """A float32 CLIP on the CPU: real weights (`clip.load`, cached download, or a local .pt),
    the small CLIP pretrained on the shapes world that ships in weights/ ('shapes', pretrain.py)
    or, for 'tiny' and with `random_init`, seeded random weights of the named architecture."""
    if name == "shapes" and not random_init:
        import pretrain  # late: pretrain imports this package's shapes world
        return pretrain.load_shapes_clip(weights or None)
    if weights:
        if not os.path.isfile(weights):
            raise FedMPTError(f"--clip-weights {weights}: no such file.")
        return clip.load(weights, device="cpu", jit=False)[0].float().eval()
    if name == "tiny" or random_init:
        if name not in ARCHITECTURES:
            raise FedMPTError(f"--clip {name}: no random-init architecture for it; choose one of "
                              f"{', '.join(ARCHITECTURES)}.")
        torch.manual_seed(seed)
        return clip.model.CLIP(*ARCHITECTURES[name]).float().eval()
    if name not in clip.available_models():
        raise FedMPTError(f"--clip {name}: unknown; choose 'tiny' or one of "
                          f"{', '.join(clip.available_models())}, or pass --clip-weights PATH.")
    cache_dir = cache_dir or os.path.expanduser("~/.cache/clip")
    file_name = os.path.basename(clip.clip._MODELS[name])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an offline machine must fail fast, not hang
    try:
        return clip.load(name, device="cpu", jit=False, download_root=cache_dir)[0].float().eval()
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise FedMPTError(
            f"could not load CLIP {name} ({error}). Without network, download {file_name} "
            f"elsewhere and put it at {os.path.join(cache_dir, file_name)}, or pass "
            "--clip-weights PATH.") from None
    finally:
        socket.setdefaulttimeout(previous)


class FrozenCLIP(nn.Module):
    """The frozen CLIP, reached into in one place: patch tokens and prompt embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.is_vit = isinstance(model.visual, clip.model.VisionTransformer)
        self.width = model.text_projection.shape[1]  # D
        self.resolution = model.visual.input_resolution
        self.context_length = model.context_length

    def fingerprint(self) -> str:
        """sha256 of every weight: a saved run names the exact backbone it was trained on."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: BatchNorm statistics and dropout stay frozen

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor):
        """Global feature v (B, D) and patch features P (B, N, D) of images (B, 3, H, W)."""
        if self.is_vit:
            return self.vit_head(self.run_blocks(self.model.visual.transformer.resblocks, self.vit_tokens(images)))
        return self.resnet_head(self.resnet_grid(images))

    # The pieces of the image encoder, for the methods that prompt or adapt inside it
    # (baselines.py); encode_image_tokens is them run straight through.
    def vit_tokens(self, images, prompts=None):
        """ViT input tokens [CLS, patches, prompts] (B, 1+N+M, W), prompts (B or 1, M, W)
        appended after the position embedding (as in VPT and MaPLe)."""
        visual = self.model.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding
        if prompts is not None:
            x = torch.cat([x, prompts.expand(x.shape[0], -1, -1)], dim=1)
        return visual.ln_pre(x)

    @staticmethod
    def run_blocks(blocks, x, after=None):
        """x (B, L, W) through CLIP residual attention blocks; `after(i, x)` may change the
        tokens after block i (deep prompts, adapters)."""
        x = x.permute(1, 0, 2)  # CLIP's blocks are sequence-first
        for i, block in enumerate(blocks):
            x = block(x)
            if after is not None:
                x = after(i, x.permute(1, 0, 2)).permute(1, 0, 2)
        return x.permute(1, 0, 2)

    def vit_head(self, x):
        """Output tokens (B, L, W) -> v (B, D) from CLS and P (B, N, D) from the patches: every
        token through ln_post and proj (tokens after the patches, i.e. prompts, are dropped)."""
        visual = self.model.visual
        n_patches = visual.positional_embedding.shape[0] - 1
        x = visual.ln_post(x[:, :1 + n_patches]) @ visual.proj
        return x[:, 0], x[:, 1:]

    def resnet_grid(self, images):
        """The ResNet tower up to its last stage: (B, W, h, w)."""
        visual = self.model.visual
        x = images.to(visual.conv1.weight.dtype)
        for layer in ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3", "relu3", "avgpool",
                      "layer1", "layer2", "layer3", "layer4"]:
            x = getattr(visual, layer)(x)
        return x

    def resnet_head(self, grid, prompts=None):
        """The attention pool gives v (B, D): its query is the mean token; prompt tokens
        (B or 1, M, W), if given, join its keys and values (how baselines.py prompts a ResNet).
        Each grid cell through the pool's value and output projections (its attention
        restricted to itself) gives a patch feature (as in MaskCLIP): P (B, N, D)."""
        pool = self.model.visual.attnpool
        x = grid.flatten(2).permute(2, 0, 1)  # (N, B, W)
        x = torch.cat([x.mean(dim=0, keepdim=True), x]) + pool.positional_embedding[:, None]
        if prompts is not None:
            x = torch.cat([x, prompts.expand(x.shape[1], -1, -1).permute(1, 0, 2)])
        v = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)[0][0]
        n_cells = pool.positional_embedding.shape[0] - 1
        return v, pool.c_proj(pool.v_proj(x[1:1 + n_cells].permute(1, 0, 2)))

    def encode_prompts(self, embeddings: torch.Tensor, eot: torch.Tensor, after=None) -> torch.Tensor:
        """CLIP's text encoder on token embeddings (P, L, Dt) -> features (P, D); `after` as
        in run_blocks."""
        m = self.model
        x = self.run_blocks(m.transformer.resblocks, embeddings + m.positional_embedding, after)
        x = m.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ m.text_projection

    @torch.no_grad()
    def encode_texts(self, texts) -> torch.Tensor:
        """Normalised frozen features (len(texts), D) of plain sentences."""
        tokens = clip.tokenize(texts, context_length=self.context_length, truncate=True)
        tokens = tokens.to(self.model.token_embedding.weight.device)
        return F.normalize(self.encode_prompts(self.model.token_embedding(tokens), tokens.argmax(dim=-1)), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()


class Adapter(nn.Module):
    """Residual bottleneck: x -> (1 - alpha) x + alpha Up(ReLU(Down(x))). Up starts at zero, so
    the adapter starts as a rescaling that cosine similarity ignores."""

    def __init__(self, width: int, reduction: int = 4, alpha: float = 0.2):
        super().__init__()
        self.down, self.up, self.alpha = nn.Linear(width, width // reduction), nn.Linear(width // reduction, width), alpha
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return (1 - self.alpha) * x + self.alpha * self.up(F.relu(self.down(x)))


@dataclass
class ModelConfig:
    n_ctx: int = 16  # M context tokens per condition and sign
    ot_eps: float = 0.1  # entropic regularisation of the patch-condition transport
    ot_iters: int = 100
    ot: str = "sinkhorn"  # or "uniform": the independent plan (ablation)
    ot_rho: float = 0.1  # region-marginal KL weight: > 0 semi-relaxed (regions may stay out); 0 = exact (the spec)
    gate: str = "mlp"  # or "uniform": weights 1/K (ablation)
    adapter_reduction: int = 4
    adapter_alpha: float = 0.5  # 0.2 (CLIP-Adapter) learned too slowly offline; 0.8 diverged


class PromptModel(nn.Module):
    """What the federated loop asks of a method (FedMPT below, the baselines in baselines.py):

    encode_images(images) -> tuple   the frozen inputs of a batch, computed once per run
    text_features()                  the text side, reused over a whole evaluation
    forward(*inputs, T=None)         logits (B, C); sigmoid gives the probabilities
    loss(inputs, targets, loss_fn)   the training loss of a batch
    tunable_state()                  exactly the tensors that train and travel
    """

    inputs_start_with_v = True  # encode_images' first tensor is the frozen global feature v

    def encode_images(self, images):
        return self.backbone.encode_image_tokens(images)

    def text_features(self):
        return None

    def loss(self, inputs, targets, loss_fn):
        return loss_fn(self(*inputs), targets)

    @property
    def device(self):
        return self.backbone.model.logit_scale.device

    def tunable_state(self) -> dict:
        """Exactly the tensors FedAvg exchanges: every parameter that trains."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_tunable_state(self, state: dict):
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        if set(state) != expected:
            raise FedMPTError(f"tunable state does not match this model: missing "
                              f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}.")
        self.load_state_dict(state, strict=False)


class FedMPT(PromptModel):
    def __init__(self, backbone: FrozenCLIP, class_names, conditions, cfg: ModelConfig):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        D = backbone.width
        self.prompts = ConditionPrompts(class_names, conditions, cfg.n_ctx,
                                        backbone.model.token_embedding, backbone.context_length,
                                        clip.tokenize)
        self.text_adapter = Adapter(D, cfg.adapter_reduction, cfg.adapter_alpha)
        self.patch_adapter = Adapter(D, cfg.adapter_reduction, cfg.adapter_alpha)
        # one condition: softmax over one logit is 1, so a gate would have nothing to learn
        self.gate = ConditionGate(D, len(conditions), uniform=cfg.gate == "uniform" or len(conditions) == 1)

    def text_features(self) -> torch.Tensor:
        """All 2*K*C condition prompts through the text encoder in one call -> (2, K, C, D)."""
        K, C = self.prompts.shape
        embeddings, eot = self.prompts()  # (2*K*C, L, Dt)
        T = self.text_adapter(self.backbone.encode_prompts(embeddings, eot))  # (2*K*C, D)
        return F.normalize(T, dim=-1).reshape(2, K, C, -1)

    def forward(self, v: torch.Tensor, P: torch.Tensor, T: torch.Tensor = None):
        """Logits (B, C) from frozen image features v (B, D) and P (B, N, D). Pass T to reuse
        the text features (evaluation: they do not depend on the image)."""
        return self.explain(v, P, T)[0]

    def explain(self, v, P, T=None):
        """Logits (B, C), the transport plans Q (B, 2, C, N, K) and the gate g (B, K)."""
        T = self.text_features() if T is None else T  # (2, K, C, D)
        K = T.shape[1]
        P = F.normalize(self.patch_adapter(P), dim=-1)  # (B, N, D)
        S = torch.einsum("bnd,skcd->bscnk", P, T)  # (B, 2, C, N, K)
        # One batched solve for all B*2*C problems. The plan is computed on a detached cost:
        # gradients reach the cosines through z, not through the Sinkhorn iterations (ot.py).
        if self.cfg.ot == "uniform":
            Q = ot.uniform_plan(S)
        else:
            Q = ot.sinkhorn(1 - S.detach(), self.cfg.ot_eps, n_iters=self.cfg.ot_iters, rho=self.cfg.ot_rho or None)
        z = K * (Q * S).sum(dim=-2)  # (B, 2, C, K)
        g = self.gate(v)  # (B, K)
        return self.backbone.logit_scale * torch.einsum("bk,bck->bc", g, z[:, 0] - z[:, 1]), Q, g


def asymmetric_loss(logits, targets, gamma_neg=2.0, gamma_pos=1.0, clip_margin=0.05):
    """ASL (Ridnik et al., ICCV 2021), summed over images and classes; targets in {1, 0, -1},
    -1 (e.g. VOC difficult-only) is masked out.
        L+ = -(1 - p)^gamma_pos log p,   L- = -p_m^gamma_neg log(1 - p_m),  p_m = max(p - m, 0)"""
    p = torch.sigmoid(logits)
    positive, known = (targets == 1).float(), (targets >= 0).float()
    p_m = (p - clip_margin).clamp(min=0)
    loss_pos = (1 - p).pow(gamma_pos) * F.logsigmoid(logits)
    loss_neg = p_m.pow(gamma_neg) * torch.log((1 - p_m).clamp(min=1e-8))
    return -((positive * loss_pos + (1 - positive) * loss_neg) * known).sum()


def bce_loss(logits, targets):
    """Binary cross-entropy summed over images and known classes (targets -1 masked out)."""
    known = (targets >= 0).float()
    return (F.binary_cross_entropy_with_logits(logits, (targets == 1).float(), reduction="none") * known).sum()
