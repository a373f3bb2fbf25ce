"""Condition prompts: what FedMPT's text side learns, and where its conditions come from.

One prompt per (condition k, class c) and sign s in {+, -}:

    [SOS] ctx^s_k,1 ... ctx^s_k,M  <condition k> <class name c> . [EOT]

The M context vectors are learnable and shared by all classes of a condition (one set for the
positive, one for the negative prompt, as in DualCoOp); the tokens of the condition and class
name are fixed buffers (as in CoOp's PromptLearner). Conditions are short phrases (colour,
background, ...) that explain why labels co-occur; a JSON file per dataset holds them.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

from errors import FedMPTError

CONDITIONS_DIR = Path(__file__).resolve().parent / "conditions"
DEFAULT_CONDITIONS = ["color", "background", "scene type", "spatial layout", "pose"]


def load_conditions(spec: str, dataset: str) -> dict:
    """Resolve `--conditions`: '' = the shipped file of the dataset, 'none' = one generic
    condition (the ablation), anything else = a path to a condition file."""
    if spec == "none":
        return {"dataset": dataset, "conditions": [""], "source": "none"}
    path = Path(spec) if spec else CONDITIONS_DIR / f"{dataset}.json"
    if not spec and not path.exists():
        return {"dataset": dataset, "conditions": list(DEFAULT_CONDITIONS), "source": "default"}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FedMPTError(f"cannot read condition file {path}: {error}. "
                          "Pass --conditions FILE with a JSON file, or 'none'.") from None
    conditions = data.get("conditions") if isinstance(data, dict) else None
    if not conditions or not all(isinstance(c, str) and c.strip() for c in conditions):
        raise FedMPTError(f"condition file {path} needs a non-empty list of strings under "
                          "'conditions'.")
    return {"dataset": data.get("dataset", dataset), "conditions": conditions,
            "source": data.get("source", "unknown"), "file": str(path)}


class ConditionPrompts(nn.Module):
    """Learnable contexts for K conditions x {+, -}; fixed condition and class-name tokens."""

    def __init__(self, class_names, conditions, n_ctx, token_embedding, context_length, tokenize):
        super().__init__()
        K, C, M = len(conditions), len(class_names), n_ctx
        width = token_embedding.weight.shape[1]
        placeholder = " ".join(["X"] * M)
        texts = [f"{placeholder} {cond} {name}.".replace("  ", " ")
                 for cond in conditions for name in class_names]
        try:
            tokens = tokenize(texts, context_length=context_length)  # (K*C, L)
        except RuntimeError:
            raise FedMPTError(f"a condition prompt does not fit CLIP's {context_length} tokens "
                              f"with {M} context tokens; shorten the conditions or use a "
                              "smaller --n-ctx.") from None
        with torch.no_grad():
            embedded = token_embedding(tokens).reshape(K, C, context_length, width)
        self.register_buffer("prefix", embedded[:, :, :1].clone(), persistent=False)  # (K, C, 1, Dt)
        self.register_buffer("suffix", embedded[:, :, 1 + M:].clone(), persistent=False)  # (K, C, L-1-M, Dt)
        self.register_buffer("eot", tokens.argmax(dim=-1).repeat(2), persistent=False)  # (2*K*C,)
        generator = torch.Generator().manual_seed(0)
        self.context = nn.Parameter(0.02 * torch.randn(2, K, M, width, generator=generator))  # (2, K, M, Dt)
        self.shape = (K, C)

    def forward(self):
        """Prompt embeddings (2*K*C, L, Dt), sign-major, and their end-token positions."""
        K, C = self.shape
        context = self.context[:, :, None].expand(-1, -1, C, -1, -1)  # (2, K, C, M, Dt)
        prefix = self.prefix.expand(2, -1, -1, -1, -1)
        suffix = self.suffix.expand(2, -1, -1, -1, -1)
        prompts = torch.cat([prefix, context, suffix], dim=3)  # (2, K, C, L, Dt)
        return prompts.flatten(0, 2), self.eot
