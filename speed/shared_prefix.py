"""Shared-prefix text encoding: the condition prompts through CLIP's text encoder with every
prefix run once (`--text-encoding shared`, and `auto` on CUDA).

Every class of a condition and sign starts with the same [SOS, contexts, condition tokens]
(with class contexts: [SOS, shared contexts]). CLIP's text transformer is causal, so a prefix's
hidden states do not depend on what follows it: it runs once per group, and what follows it in
each prompt, up to its end token (its suffix), is packed with other classes' suffixes into rows
of at most 32 slots, each slot attending to its group's prefix and to its own prompt's earlier
slots. The result equals FrozenCLIP.encode_prompts on the whole prompts (float32 to 1e-5,
float64 to 1e-12; tests/test_speed.py); on VOC with ViT-B/16 it runs about a quarter of the
positions.

    model = SharedPrefixText(model)     # the same model, its text side through encode_shared
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def pack(sizes, capacity) -> list:
    """First fit, largest first: items of `sizes` into rows of at most `capacity` slots ->
    [[[(item, first slot), ...], fill], ...]."""
    rows = []
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r in rows if r[1] + sizes[item] <= capacity), None)
        if row is None:
            rows.append(row := [[], 0])
        row[0].append((item, row[1]))
        row[1] += sizes[item]
    return rows


class SharedLayout(nn.Module):
    """Where each token of a ConditionPrompts set goes in the shared layout. Groups are the
    (sign, condition) pairs, sign-major as the prompts are: group g has condition g % K. Buffers:
    length (S*K,) each group's prefix length; position (K, R, Ls) each slot's position in its
    prompt; owner (R, Ls) each slot's class (-1: padding); offset (R, Ls) its place after the
    prefix; sees (R, Ls, Ls) the slots of its row it attends to; bins (C,) each class's row;
    end (S*K, C) each prompt's end-token slot."""

    def __init__(self, prompts):
        super().__init__()
        (K, C), cut = prompts.shape, 1 + prompts.n_ctx
        tokens = prompts.tokens.cpu().reshape(K, C, -1)  # laid out on the CPU, once
        L = tokens.shape[-1]
        eot = tokens.argmax(dim=-1)  # (K, C)
        lengths = []
        for k in range(K):  # the condition's tokens: where all its classes agree, before any end token
            n = cut
            while not prompts.class_ctx and n < int(eot[k].min()) and bool((tokens[k, :, n] == tokens[k, 0, n]).all()):
                n += 1
            lengths.append(n)
        length = torch.tensor(lengths)  # (K,)
        need = (eot - length[:, None] + 1).amax(dim=0).tolist()  # slots of each class's suffix (C,)
        rows = min((pack(need, capacity) for capacity in range(max(need), max(32, max(need)) + 1)),
                   key=lambda rows: (len(rows) * max(fill for _, fill in rows), max(fill for _, fill in rows)))
        R, Ls = len(rows), max(fill for _, fill in rows)
        owner = torch.full((R, Ls), -1)
        offset = torch.zeros(R, Ls, dtype=torch.long)
        bins, first = torch.zeros(C, dtype=torch.long), torch.zeros(C, dtype=torch.long)
        for r, (members, _) in enumerate(rows):
            for c, slot in members:
                owner[r, slot:slot + need[c]], offset[r, slot:slot + need[c]] = c, torch.arange(need[c])
                bins[c], first[c] = r, slot
        same = (owner[:, :, None] == owner[:, None, :]) & (offset[:, None, :] <= offset[:, :, None])
        sees = (same & (owner[:, :, None] >= 0)) | torch.eye(Ls, dtype=torch.bool)  # padding sees itself
        S, device = prompts.signs, prompts.tokens.device
        self.prefix_positions, self.rows = max(lengths), (R, Ls)  # Lp; the packed suffixes: R rows of Ls slots
        buffers = {"length": length.repeat(S), "position": (length[:, None, None] + offset).clamp(max=L - 1),
                   "owner": owner, "offset": offset, "sees": sees, "bins": bins,
                   "end": (first + (eot - length[:, None])).repeat(S, 1)}
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor.to(device), persistent=False)

    def split(self, embeddings):
        """Whole prompt embeddings (G*C, L, Dt), G a multiple of S*K (several clients' sets stacked)
        -> prefixes (G, Lp, Dt), their lengths (G,), packed suffixes (G, R, Ls, Dt) (padding 0) and
        the end-token slots (G, C). The prefix of a group is its first class's: they all share it."""
        C, (K, R, Ls) = len(self.bins), self.position.shape
        x = embeddings.unflatten(0, (-1, C))  # (G, C, L, Dt)
        G, repeats = x.shape[0], x.shape[0] // len(self.length)
        position = self.position.repeat(G // K, 1, 1)  # (G, R, Ls)
        klass = self.owner.clamp(min=0).expand(G, -1, -1)
        suffix = x[torch.arange(G, device=x.device)[:, None, None], klass, position]  # (G, R, Ls, Dt)
        suffix = suffix.masked_fill((self.owner < 0)[..., None], 0)
        return (x[:, 0, :self.prefix_positions], self.length.repeat(repeats), suffix,
                self.end.repeat(repeats, 1))


def attend(q, k, v, mask) -> torch.Tensor:
    """Attention over (G, R, H, L, W/H) tensors with a boolean mask (G, R, 1, L, S), as the 4-d
    batches fused kernels take."""
    flat = lambda t: t.expand(*q.shape[:2], *t.shape[2:]).flatten(0, 1)
    return F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=flat(mask)).unflatten(0, q.shape[:2])


def encode_shared(backbone, layout: SharedLayout, embeddings) -> torch.Tensor:
    """CLIP's text encoder on whole prompt embeddings (G*C, L, Dt) by the shared layout -> features
    (G*C, D), equal to backbone.encode_prompts. A suffix slot sits at position length[g] +
    offset[r, i] of its prompt and attends to its group's real prefix and to the slots sees[r, i]
    of its row, through CLIP's own attention weights; the last block runs only the end tokens'
    queries."""
    m, blocks = backbone.model, backbone.model.transformer.resblocks
    prefix, length, suffix, end = layout.split(embeddings)
    (G, Lp, _), (R, Ls) = prefix.shape, layout.offset.shape
    positions = (length[:, None, None] + layout.offset).clamp(max=backbone.context_length - 1)  # (G, R, Ls)
    xp = prefix + m.positional_embedding[:Lp]  # (G, Lp, W)
    xs = suffix + m.positional_embedding[positions]  # (G, R, Ls, W)
    real = torch.arange(Lp, device=prefix.device) < length[:, None]  # (G, Lp) the unpadded prefix
    # (G, R, Ls, Lp + Ls): each slot sees its group's real prefix and its own prompt's slots up to itself
    mask = torch.cat([real[:, None, None].expand(-1, R, Ls, -1), layout.sees.expand(G, -1, -1, -1)], -1)
    for block in blocks[:-1]:
        xp, xs = shared_block(block, xp, xs, mask)
    ends = m.ln_final(shared_ends(blocks[-1], xp, xs, mask, layout.bins, end))  # (G, C, W)
    with torch.autocast(ends.device.type, enabled=False):  # as encode_prompts: the projection in float32
        return (ends.to(m.text_projection.dtype) @ m.text_projection).flatten(0, 1)


def shared_qkv(block, x):
    """Queries, keys and values (..., H, L, W/H) of tokens x (..., L, W) by the block's own weights."""
    attn, W = block.attn, x.shape[-1]
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return [t.unflatten(-1, (attn.num_heads, W // attn.num_heads)).transpose(-2, -3) for t in qkv]


def shared_block(block, xp, xs, mask):
    """One CLIP residual attention block on prefixes xp (G, Lp, W) and packed suffixes xs
    (G, R, Ls, W); mask (G, R, Ls, Lp + Ls): the keys, [prefix, row], each slot attends to."""
    R, out = xs.shape[1], block.attn.out_proj
    qp, kp, vp = shared_qkv(block, xp)  # (G, H, Lp, W/H)
    qs, ks, vs = shared_qkv(block, xs)  # (G, R, H, Ls, W/H)
    keys = torch.cat([kp[:, None].expand(-1, R, -1, -1, -1), ks], dim=-2)  # (G, R, H, Lp + Ls, W/H)
    values = torch.cat([vp[:, None].expand(-1, R, -1, -1, -1), vs], dim=-2)
    yp = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # the prefixes' own causal attention
    ys = attend(qs, keys, values, mask[:, :, None])  # (G, R, H, Ls, W/H)
    xp = xp + out(yp.transpose(-2, -3).flatten(-2))
    xs = xs + out(ys.transpose(-2, -3).flatten(-2))
    return xp + block.mlp(block.ln_2(xp)), xs + block.mlp(block.ln_2(xs))


def shared_ends(block, xp, xs, mask, bins, end):
    """The last block, for the end tokens alone (G, C, W): their queries against their rows' keys."""
    (G, C), attn, W = end.shape, block.attn, xs.shape[-1]
    _, kp, vp = shared_qkv(block, xp)  # (G, H, Lp, W/H)
    _, ks, vs = shared_qkv(block, xs)  # (G, R, H, Ls, W/H)
    x = xs[torch.arange(G, device=xs.device)[:, None], bins, end]  # (G, C, W) the end tokens
    q = F.linear(block.ln_1(x), attn.in_proj_weight[:W], attn.in_proj_bias[:W])  # (G, C, W) queries only
    q = q.unflatten(-1, (attn.num_heads, W // attn.num_heads))[:, :, :, None]  # (G, C, H, 1, W/H)
    keys = torch.cat([kp[:, None].expand(-1, C, -1, -1, -1), ks[:, bins]], dim=-2)  # (G, C, H, Lp + Ls, W/H)
    values = torch.cat([vp[:, None].expand(-1, C, -1, -1, -1), vs[:, bins]], dim=-2)
    rows = mask[:, bins].gather(2, end[:, :, None, None].expand(-1, -1, 1, mask.shape[-1]))  # (G, C, 1, Lp+Ls)
    y = attend(q, keys, values, rows[:, :, None])[:, :, :, 0]  # (G, C, H, W/H)
    x = x + block.attn.out_proj(y.flatten(-2))
    return x + block.mlp(block.ln_2(x))


class SharedPrefixText(nn.Module):
    """A prompt model (fedmpt.PromptModel with `text_inputs` and `text_from`) whose text side goes
    through encode_shared; everything else is the model's own (its tunable state, its names)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.layout = model, SharedLayout(model.prompts)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # this module's own parts: model, layout
        except AttributeError:
            return getattr(self._modules["model"], name)

    def encode_prompts(self, embeddings, eot=None) -> torch.Tensor:
        """What backbone.encode_prompts gives for whole prompts (eot: their end tokens, in the layout)."""
        backbone = self.model.backbone
        with backbone.autocast():
            return encode_shared(backbone, self.layout, embeddings)

    def text_features(self):
        return self.model.text_from(self.encode_prompts(*self.model.text_inputs()))

    def forward(self, *inputs, T=None):
        return self.model(*inputs, T=self.text_features() if T is None else T)

    def loss(self, inputs, targets, loss_fn, T=None):
        return self.model.loss(inputs, targets, loss_fn, T=self.text_features() if T is None else T)


def text_positions(model) -> dict:
    """A prompt set's text-encoder positions: run by the shared layout, the exact minimum (each
    prefix once per group, each suffix to its end token), and the whole prompts (encode_prompts
    runs max(eot) + 1 positions of each)."""
    prompts, layout = model.prompts, SharedLayout(model.prompts)
    length, (R, Ls) = layout.length.cpu(), layout.rows
    eot = prompts.eot.reshape(len(length), -1).cpu()  # (S*K, C)
    return {"run": len(length) * (layout.prefix_positions + R * Ls),
            "minimum": int(length.sum() + (eot - length[:, None] + 1).sum()),
            "whole": len(prompts.eot) * (int(prompts.eot.max()) + 1)}
