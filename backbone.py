"""The frozen CLIP: loading it, and reaching into it in one place.

`load_clip` gives a float32 CLIP (real weights, or seeded random weights of a named
architecture for cost and shape checks). `FrozenCLIP` wraps it and exposes the pieces the
methods need: the global feature v and patch features P of an image, and CLIP's text
transformer run on prompt embeddings (learned context tokens in place of words).
"""
import hashlib
import os
import pickle
import socket
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised inside clip
import clip  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from errors import FedMPTError  # noqa: E402

# (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#  context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
ARCHITECTURES = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    # A small random CLIP for shape and cost checks: 64 px, 8 px patches -> N = 64 regions, seeded weights.
    "tiny": (128, 64, 2, 128, 8, 32, 49408, 128, 2, 2),
}


def quiet_clip_load(name: str, **where) -> nn.Module:
    """clip.load onto the CPU in float32, without its FutureWarning: it opens the official weights (TorchScript)
    with torch.jit.load, which a later torch may drop; today they load exactly (jit=False rebuilds the model)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.load` is", category=FutureWarning)
        return clip.load(name, device="cpu", jit=False, **where)[0].float().eval()


def load_clip(name: str, weights: str = None, random_init: bool = False, seed: int = 0,
              cache_dir: str = None) -> nn.Module:
    """A float32 CLIP on the CPU: real weights (`clip.load`, cached download, or a local .pt)
    or, for 'tiny' and with `random_init`, seeded random weights of the named architecture.
    (The small CLIP of the offline world, 'shapes', is loaded by shapes/model.py.)"""
    if weights:
        if not os.path.isfile(weights):
            raise FedMPTError(f"--clip-weights {weights}: no such file.")
        try:
            return quiet_clip_load(weights)
        except (RuntimeError, KeyError, ValueError, EOFError, AttributeError, pickle.UnpicklingError) as error:
            raise FedMPTError(f"--clip-weights {weights}: not a CLIP checkpoint ({type(error).__name__}); pass the "
                              ".pt file clip.load downloads (e.g. ~/.cache/clip/ViT-B-16.pt).") from None
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
        return quiet_clip_load(name, download_root=cache_dir)
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
        self.precision = "fp32"  # of the encoders where tuned tensors pass (--precision; experiment.load_backbone sets it)

    def fingerprint(self) -> str:
        """sha256 of every weight: a saved run names the exact backbone it was trained on
        (computed once: the weights are frozen)."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256()
            for name, tensor in self.model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def autocast(self, precision=None):
        """The frozen encoders' precision where tuned tensors pass through them (prompts, deep
        prompts, adapters): bf16 under torch.autocast with --precision bf16, else float32. Callers
        turn what comes out back to float32; frozen features for the store stay float32."""
        device = self.model.logit_scale.device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=(precision or self.precision) == "bf16")

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: BatchNorm statistics and dropout stay frozen

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor):
        """Global feature v (B, D) and patch features P (B, N, D) of images (B, 3, H, W)."""
        if self.is_vit:
            return self.vit_head(self.run_blocks(self.model.visual.transformer.resblocks, self.vit_tokens(images)))
        return self.resnet_head(self.resnet_grid(images))

    # The pieces of the image encoder, for the methods that prompt or adapt inside it
    # (baselines/); encode_image_tokens is them run straight through.
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
    def run_blocks(blocks, x, after=None, attn_mask=None):
        """x (B, L, W) through CLIP residual attention blocks; `after(i, x)` may change the
        tokens after block i (deep prompts, adapters). `attn_mask` (L, L) replaces the blocks'
        own mask (the text blocks hold a causal mask of the full context length)."""
        x = x.permute(1, 0, 2)  # CLIP's blocks are sequence-first
        for i, block in enumerate(blocks):
            if attn_mask is None:
                x = block(x)
            else:  # CLIP's ResidualAttentionBlock.forward, with this mask
                y = block.ln_1(x)
                x = x + block.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
                x = x + block.mlp(block.ln_2(x))
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
        (B or 1, M, W), if given, join its keys and values (how baselines/maple.py prompts a ResNet).
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

    def encode_prompts(self, embeddings: torch.Tensor, eot: torch.Tensor, after=None, precision=None) -> torch.Tensor:
        """CLIP's text encoder on token embeddings (P, L, Dt) -> features (P, D), at the run's precision
        (float32 out); `after` as in run_blocks. Exact and short: the encoder is causal, so callers cut
        prompts after the last end token once, when built (ConditionPrompts, encode_texts; no host read
        in a step), and all L positions run under the causal mask (CLIP's encode_text for L > max(eot))."""
        m, n = self.model, embeddings.shape[1]  # L: the positions that matter, for every prompt
        mask = torch.full((n, n), float("-inf"), dtype=embeddings.dtype, device=embeddings.device).triu(1)
        with self.autocast(precision):
            x = self.run_blocks(m.transformer.resblocks, embeddings + m.positional_embedding[:n], after, mask)
            x = m.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]  # (P, Dt) the end tokens
        with torch.autocast(x.device.type, enabled=False):  # the projection in float32: bf16 would round the features
            return x.to(m.text_projection.dtype) @ m.text_projection

    @torch.no_grad()
    def encode_texts(self, texts) -> torch.Tensor:
        """Normalised frozen features (len(texts), D) of plain sentences."""
        tokens = clip.tokenize(texts, self.context_length, truncate=True).to(self.model.token_embedding.weight.device)
        eot = tokens.argmax(dim=-1)
        embeddings = self.model.token_embedding(tokens[:, :int(eot.max()) + 1])  # cut after the last end token
        return F.normalize(self.encode_prompts(embeddings, eot, precision="fp32"), dim=-1)  # frozen: float32

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()
