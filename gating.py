"""Gating over conditions: how much each condition counts for one image.

    g[b] = softmax_k(MLP(v[b]))                                  (B, K)

v is the frozen CLIP global image feature. The last layer starts at zero, so before training
every condition weighs 1/K and the gate only moves away from uniform where the data ask it to.
"""
import torch
import torch.nn as nn


class ConditionGate(nn.Module):
    def __init__(self, width: int, n_conditions: int, hidden: int = 64, uniform: bool = False):
        super().__init__()
        self.n_conditions = n_conditions
        self.uniform = uniform  # ablation `--gate uniform`: fixed weights 1/K, nothing to tune
        if not uniform:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, n_conditions))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return v.new_full((v.shape[0], self.n_conditions), 1.0 / self.n_conditions)
        v = v / v.norm(dim=-1, keepdim=True)
        return self.mlp(v).softmax(dim=-1)  # (B, K)
