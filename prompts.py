"""Condition prompts: what FedMPT's text side learns.

One prompt per (condition k, class c) and sign s in {+, -}:

    [SOS] ctx^s_k,1 ... ctx^s_k,M  <condition k> <class name c> . [EOT]

The M context vectors are learnable and shared by all classes of a condition (one set for the
positive, one for the negative prompt, as in DualCoOp); the tokens of the condition and class
name are fixed buffers (as in CoOp's PromptLearner). With ctx_init (CoOp's, e.g. "a photo of
a") the template's embeddings start the last positive contexts; the rest, and the negative ones,
stay random. With class_ctx = Mc > 0 each class also gets Mc contexts of its own (per sign,
shared by the conditions: CoOp's class-specific context), placed after the shared ones:

    [SOS] ctx^s_k,1 ... ctx^s_k,M  cls^s_c,1 ... cls^s_c,Mc  <condition k> <class name c> . [EOT]

This is not in the paper; it is for class names the text tower barely tells apart (the
vocabulary check, experiment.similar_classes), whose prompts otherwise start, and stay, alike.
Conditions are short phrases (colour, background, ...) that explain why labels co-occur; they
come in as arguments (the shipped files and the LLM discovery live in conditions/).
"""

import torch
import torch.nn as nn

from errors import FedMPTError


class ConditionPrompts(nn.Module):
    """Learnable contexts for K conditions x {+, -}; fixed condition and class-name tokens.
    With conditions [""] these are DualCoOp's prompts (CoOp's with signs=1; baselines/coop.py)."""

    def __init__(self, class_names, conditions, n_ctx, token_embedding, context_length, tokenize, signs=2,
                 class_ctx=0, ctx_init=""):
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
        self.register_buffer("tokens", tokens, persistent=False)  # (K*C, L) the placeholder prompts' ids
        self.register_buffer("prefix", embedded[:, :, :1].clone(), persistent=False)  # (K, C, 1, Dt)
        eot = tokens.argmax(dim=-1)  # (K*C,) each prompt's end token
        self.positions = int(eot.max()) + 1  # Lp: read once; nothing after the last end token reaches one (causal)
        self.register_buffer("suffix", embedded[:, :, 1 + M:self.positions].clone(), persistent=False)  # (K, C, Lp-1-M, Dt)
        self.register_buffer("eot", eot.repeat(signs), persistent=False)  # (S*K*C,)
        # drawn from torch's generator like nn.Linear's weights: the model seeds it (fedmpt.seeded)
        self.context = nn.Parameter(0.02 * torch.randn(signs, K, n_ctx, width))  # (S, K, M, Dt)
        self.class_context = nn.Parameter(0.02 * torch.randn(signs, C, class_ctx, width)) if class_ctx else None
        if ctx_init:  # after the random draws: the same random values with or without it
            ids = tokenize([ctx_init], context_length=context_length)[0].to(tokens.device)  # (L,)
            n = int(ids.argmax()) - 1  # the template's tokens, between [SOS] and [EOT]
            if n > n_ctx:
                raise FedMPTError(f"--ctx-init {ctx_init!r} has {n} tokens, more than --n-ctx {n_ctx}: shorten it.")
            self.context.data[0, :, n_ctx - n:] = token_embedding(ids[1:1 + n]).detach()  # (n, Dt) into (K, n, Dt)
        self.shape, self.signs, self.n_ctx, self.class_ctx = (K, C), signs, n_ctx, class_ctx

    def forward(self, context=None):
        """Prompt embeddings (S*K*C, Lp, Dt), sign-major, cut after the last end token (Lp =
        `positions`), and their end-token positions. A `context` (S, K, M, Dt) given here replaces
        the learned one (FedTPG generates it)."""
        K, C = self.shape
        context = self.context if context is None else context
        context = context[:, :, None].expand(-1, -1, C, -1, -1)  # (S, K, C, M, Dt)
        if self.class_context is not None:  # (S, C, Mc, Dt) after the shared contexts
            own = self.class_context[:, None].expand(-1, K, -1, -1, -1)
            context = torch.cat([context, own], dim=3)  # (S, K, C, M + Mc, Dt)
        prefix = self.prefix.expand(self.signs, -1, -1, -1, -1)
        suffix = self.suffix.expand(self.signs, -1, -1, -1, -1)
        prompts = torch.cat([prefix, context, suffix], dim=3)  # (S, K, C, Lp, Dt)
        return prompts.flatten(0, 2), self.eot
