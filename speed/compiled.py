"""Fewer, larger kernels for a training step (`--compile`): the model's loss compiled by
torch.compile, CLIP's attention blocks run batch-first straight into scaled_dot_product_attention,
and the Sinkhorn's iterations fused (speed/fused_sinkhorn.py). Each equals the plain path up to
float rounding (float32 tolerance; tests/test_speed.py).

CLIP's own blocks are sequence-first nn.MultiheadAttention: every block permutes its tokens, splits
the packed projection into three copies and reshapes them before the fused attention kernel, and
again on the way back. `run_blocks` below keeps the tokens (B, L, W) as they are and views the one
projection as queries, keys and values. The swaps hold only while a training loss runs
(`fused_kernels`), so the frozen features in the feature store are always the plain path's.

    model = CompiledStep(model)     # the same model; its loss compiled, on the fused kernels
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import ot
from speed.fused_sinkhorn import sinkhorn as fused_sinkhorn


def block_forward(block, x, attn_mask=None):
    """CLIP's ResidualAttentionBlock on batch-first tokens x (B, L, W); `attn_mask` (L, L) replaces
    the block's own (as in FrozenCLIP.run_blocks)."""
    attn, (B, L, W) = block.attn, x.shape
    mask = block.attn_mask if attn_mask is None else attn_mask
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3W)
    q, k, v = qkv.view(B, L, 3, attn.num_heads, W // attn.num_heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, W/H)
    mask = None if mask is None else mask.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, W/H)
    x = x + attn.out_proj(y.transpose(1, 2).reshape(B, L, W))
    return x + block.mlp(block.ln_2(x))


def run_blocks(blocks, x, after=None, attn_mask=None):
    """FrozenCLIP.run_blocks, batch-first: x (B, L, W) through the blocks, `after(i, x)` after block i."""
    for i, block in enumerate(blocks):
        x = block_forward(block, x, attn_mask)
        if after is not None:
            x = after(i, x)
    return x


@contextmanager
def fused_kernels(backbone):
    """While it holds: `backbone.run_blocks` is the batch-first run_blocks above and ot.sinkhorn the
    fused one (the method files call both by name); both are restored after."""
    solve = ot.sinkhorn
    backbone.run_blocks, ot.sinkhorn = run_blocks, fused_sinkhorn
    try:
        yield
    finally:
        del backbone.run_blocks  # back to FrozenCLIP.run_blocks
        ot.sinkhorn = solve


class CompiledStep(nn.Module):
    """A prompt model whose training loss runs compiled, on the fused kernels; everything else
    (its tunable state, its names, evaluation) is the model's own."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.compiled_loss = torch.compile(model.loss)  # compiled at the first step of each batch shape

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # this module's own part: model
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *inputs, T=None):
        return self.model(*inputs, T=T)

    def loss(self, inputs, targets, loss_fn, T=None):
        with fused_kernels(self.model.backbone):
            return self.compiled_loss(inputs, targets, loss_fn, T=T)
