"""Condition prompts: what FedMPT's text side learns.

One prompt per (condition k, class c) and sign s in {+, -}:

    [SOS] ctx^s_k,1 ... ctx^s_k,M  <condition k> <class name c> . [EOT]

The M context vectors are learnable and shared by all classes of a condition (one set for the
positive, one for the negative prompt, as in DualCoOp); the tokens of the condition and class
name are fixed buffers (as in CoOp's PromptLearner). With class_ctx = Mc > 0 each class also
gets Mc contexts of its own (per sign, shared by the conditions: CoOp's class-specific context),
placed after the shared ones:

    [SOS] ctx^s_k,1 ... ctx^s_k,M  cls^s_c,1 ... cls^s_c,Mc  <condition k> <class name c> . [EOT]

This is not in the paper; it is for class names the text tower barely tells apart (the
vocabulary check, experiment.similar_classes), whose prompts otherwise start, and stay, alike.
Conditions are short phrases (colour, background, ...) that explain why labels co-occur; they
come in as arguments (the shipped files and the LLM discovery live in conditions/).
"""

import torch
import torch.nn as nn

from errors import FedMPTError


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


class ConditionPrompts(nn.Module):
    """Learnable contexts for K conditions x {+, -}; fixed condition and class-name tokens.
    With conditions [""] these are DualCoOp's prompts (CoOp's with signs=1; baselines/coop.py)."""

    def __init__(self, class_names, conditions, n_ctx, token_embedding, context_length, tokenize, signs=2,
                 class_ctx=0):
        super().__init__()
        K, C, M = len(conditions), len(class_names), n_ctx + class_ctx
        width = token_embedding.weight.shape[1]
        placeholder = " ".join(["X"] * M)
        texts = [f"{placeholder} {cond} {name}.".replace("  ", " ")
                 for cond in conditions for name in class_names]
        try:
            tokens = tokenize(texts, context_length=context_length)  # (K*C, L)
        except RuntimeError:
            raise FedMPTError(f"a condition prompt does not fit CLIP's {context_length} tokens "
                              f"with {M} context tokens; shorten the conditions or use a "
                              "smaller --n-ctx or --class-ctx.") from None
        with torch.no_grad():
            tokens = tokens.to(token_embedding.weight.device)
            embedded = token_embedding(tokens).reshape(K, C, context_length, width)
        self.register_buffer("prefix", embedded[:, :, :1].clone(), persistent=False)  # (K, C, 1, Dt)
        self.register_buffer("suffix", embedded[:, :, 1 + M:].clone(), persistent=False)  # (K, C, L-1-M, Dt)
        self.register_buffer("eot", tokens.argmax(dim=-1).repeat(signs), persistent=False)  # (S*K*C,)
        self.whole_positions = int(self.eot.max()) + 1  # what encode_prompts runs of whole prompts
        # drawn from torch's generator like nn.Linear's weights: the model seeds it (fedmpt.seeded)
        self.context = nn.Parameter(0.02 * torch.randn(signs, K, n_ctx, width))  # (S, K, M, Dt)
        self.class_context = nn.Parameter(0.02 * torch.randn(signs, C, class_ctx, width)) if class_ctx else None
        self.shape, self.signs = (K, C), signs
        self.share_layout(tokens.reshape(K, C, -1), embedded, 1 + n_ctx, class_ctx)

    def share_layout(self, tokens, embedded, cut, class_ctx):
        """The shared-prefix layout (FrozenCLIP.encode_shared). Every class of a condition and sign
        starts with the same [SOS, contexts, condition tokens] (with class contexts, [SOS, shared
        contexts]): that prefix runs once. What follows it in each prompt, up to its end token (its
        suffix), is packed with other classes' suffixes into rows of at most 32 slots (`pack`, the
        row length that leaves the fewest slots), so padding stays small for any class names."""
        device, tokens, embedded = embedded.device, tokens.cpu(), embedded.cpu()  # laid out on the CPU, once
        K, C, L = tokens.shape
        eot = tokens.argmax(dim=-1)  # (K, C)
        lengths = []
        for k in range(K):  # the condition's tokens: where all its classes agree, before any end token
            n = cut
            while not class_ctx and n < int(eot[k].min()) and bool((tokens[k, :, n] == tokens[k, 0, n]).all()):
                n += 1
            lengths.append(n)
        length = torch.tensor(lengths)  # (K,)
        need = (eot - length[:, None] + 1).amax(dim=0).tolist()  # slots of each class's suffix (C,)
        rows = min((pack(need, capacity) for capacity in range(max(need), max(32, max(need)) + 1)),
                   key=lambda rows: (len(rows) * max(fill for _, fill in rows), max(fill for _, fill in rows)))
        R, Ls = len(rows), max(fill for _, fill in rows)
        owner = torch.full((R, Ls), -1)  # the class of each slot (-1: padding)
        offset = torch.zeros(R, Ls, dtype=torch.long)  # its place after the prefix
        bins, first = torch.zeros(C, dtype=torch.long), torch.zeros(C, dtype=torch.long)
        for r, (members, _) in enumerate(rows):
            for c, slot in members:
                owner[r, slot:slot + need[c]], offset[r, slot:slot + need[c]] = c, torch.arange(need[c])
                bins[c], first[c] = r, slot
        same = (owner[:, :, None] == owner[:, None, :]) & (offset[:, None, :] <= offset[:, :, None])
        sees = (same & (owner[:, :, None] >= 0)) | torch.eye(Ls, dtype=torch.bool)  # (R, Ls, Ls) padding sees itself
        # each slot's fixed token (condition k, class c, position length[k] + offset); class contexts
        # come first in a suffix and are filled in by `shared`
        position = (length[:, None, None] + offset).clamp(max=L - 1)  # (K, R, Ls)
        klass = owner.clamp(min=0).expand(K, -1, -1)
        fixed = embedded[torch.arange(K)[:, None, None], klass, position]  # (K, R, Ls, Dt)
        fixed[:, (owner < 0) | (offset < class_ctx)] = 0
        condition = embedded[:, 0, cut:max(lengths)].clone()  # (K, Lp - 1 - M, Dt) padded after short ones
        self.prefix_positions, self.suffix_rows = max(lengths), (R, Ls)  # Lp; packed suffixes: R rows of Ls
        self.register_buffer("shared_condition", condition.to(device), persistent=False)
        self.register_buffer("shared_fixed", fixed.to(device), persistent=False)
        self.register_buffer("shared_length", length.repeat(self.signs).to(device), persistent=False)  # (S*K,)
        self.register_buffer("shared_offset", offset.to(device), persistent=False)  # (R, Ls)
        self.register_buffer("shared_sees", sees.to(device), persistent=False)  # (R, Ls, Ls)
        self.register_buffer("shared_bin", bins.to(device), persistent=False)  # (C,) each class's row
        end = first + (eot - length[:, None])  # (K, C) the end token's slot in its row
        self.register_buffer("shared_end", end.repeat(self.signs, 1).to(device), persistent=False)  # (S*K, C)
        own = torch.where(offset < class_ctx, owner.clamp(min=0) * max(class_ctx, 1) + offset, -1)
        self.register_buffer("shared_own", own.to(device), persistent=False)  # (R, Ls) index into class contexts

    def forward(self, context=None):
        """Prompt embeddings (S*K*C, L, Dt), sign-major, and their end-token positions. A
        `context` (S, K, M, Dt) given here replaces the learned one (FedTPG generates it)."""
        K, C = self.shape
        context = self.context if context is None else context
        context = context[:, :, None].expand(-1, -1, C, -1, -1)  # (S, K, C, M, Dt)
        if self.class_context is not None:  # (S, C, Mc, Dt) after the shared contexts
            own = self.class_context[:, None].expand(-1, K, -1, -1, -1)
            context = torch.cat([context, own], dim=3)  # (S, K, C, M + Mc, Dt)
        prefix = self.prefix.expand(self.signs, -1, -1, -1, -1)
        suffix = self.suffix.expand(self.signs, -1, -1, -1, -1)
        prompts = torch.cat([prefix, context, suffix], dim=3)  # (S, K, C, L, Dt)
        return prompts.flatten(0, 2), self.eot

    def shared(self, context=None):
        """The same prompts as forward, laid out for FrozenCLIP.encode_shared: (prefixes (S*K, Lp, Dt),
        their lengths (S*K,), packed suffixes (S*K, R, Ls, Dt), the layout: each slot's offset after
        the prefix (R, Ls), which slots each slot sees (R, Ls, Ls), each class's row (C,) and its end
        token's slot (S*K, C))."""
        K, C = self.shape
        context = self.context if context is None else context  # (S, K, M, Dt)
        S = self.signs
        start = self.prefix[:, 0].expand(S, -1, -1, -1)  # (S, K, 1, Dt)
        condition = self.shared_condition.expand(S, -1, -1, -1)  # (S, K, Lp - 1 - M, Dt)
        prefix = torch.cat([start, context, condition], dim=2).flatten(0, 1)  # (S*K, Lp, Dt)
        suffix = self.shared_fixed.expand(S, -1, -1, -1, -1)  # (S, K, R, Ls, Dt)
        if self.class_context is not None:  # each class's own contexts open its suffix
            own = self.class_context.flatten(1, 2)[:, self.shared_own.clamp(min=0)]  # (S, R, Ls, Dt)
            suffix = torch.where((self.shared_own >= 0)[..., None], own[:, None], suffix)
        layout = (self.shared_offset, self.shared_sees, self.shared_bin, self.shared_end)
        return prefix, self.shared_length, suffix.flatten(0, 1), *layout

    def inputs(self, backbone, context=None, after=None) -> tuple:
        """What goes into the text encoder: the shared layout (`shared`) where the backbone shares
        prefixes and no `after` hook changes tokens between layers, else the whole prompts (forward)."""
        return self.shared(context) if backbone.shares_prefixes() and after is None else self(context)

    def run(self, backbone, inputs, after=None) -> torch.Tensor:
        """Text features (rows, D), float32, of encoder `inputs` (or several stacked by
        stack_inputs) through the backbone's text encoder at its precision: encode_shared for a
        shared layout, encode_prompts for whole prompts. Both are exact."""
        with backbone.autocast():
            if len(inputs) == 2:
                features = backbone.encode_prompts(*inputs, *([after] if after else []))
            else:
                features = backbone.encode_shared(*inputs).flatten(0, 1)
        return features.float() if features.dtype in (torch.bfloat16, torch.float16) else features

    def encode(self, backbone, context=None, after=None) -> torch.Tensor:
        """Text features (S*K*C, D), sign-major, float32: `run` on this set's `inputs`."""
        return self.run(backbone, self.inputs(backbone, context, after), after)


def stack_inputs(parts) -> tuple:
    """The encoder inputs of several copies of one prompt set (ConditionPrompts.inputs, e.g. one per
    client) as one: their groups (whole prompts) one after another, and so their features."""
    if len(parts[0]) == 2:  # whole prompts: (embeddings, eot)
        return tuple(torch.cat(column) for column in zip(*parts))
    prefix, length, suffix, offset, sees, bins, end = zip(*parts)  # the layout is the set's own
    return torch.cat(prefix), torch.cat(length), torch.cat(suffix), offset[0], sees[0], bins[0], torch.cat(end)
