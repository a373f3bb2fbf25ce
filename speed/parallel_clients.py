"""Several clients of a round trained side by side in one process (`--parallel-clients N`).

Each client has its own copy of the tunable tensors, its own batches and its own optimizer; at
every step the active clients' prompts go through one text-encoder call and their losses are
summed before one backward. A client's tensors reach only its own loss, so each gets exactly its
own gradient: equal to client.local_train one client after another, up to float rounding
(tests/test_speed.py). Needs a method whose text side splits in two (`text_inputs`, `text_from`).
"""
import torch
from torch.func import functional_call

from client import batches, client_order, clip_and_step, local_optimizer, step_stats
from fedmpt import LOSSES
from speed.shared_prefix import SharedPrefixText


def train_together(model, global_state, inputs, targets, client_rows, generators, cfg, lr) -> list:
    """client.local_train for several clients side by side: [(state, n_samples, stats)] in the
    order of `client_rows` and `generators`. `global_state`, `inputs` and `targets` may also be
    lists, one per client (clients of several cells: speed/lockstep.py)."""
    encode = model.encode_prompts if isinstance(model, SharedPrefixText) else model.backbone.encode_prompts
    model = model.model if isinstance(model, SharedPrefixText) else model  # the tunable tensors' own names
    device, loss_fn = model.device, LOSSES[cfg.loss]
    each = lambda value: value if isinstance(value, list) else [value] * len(client_rows)
    states = [{f"model.{name}": t.detach().clone().requires_grad_() for name, t in state.items()}
              for state in each(global_state)]  # named as inside MethodCall
    optimizers = [local_optimizer(list(state.values()), lr) for state in states]
    orders = [client_order(rows, cfg, generator) for rows, generator in zip(client_rows, generators)]
    loaders = [batches(x, y, order, device) for x, y, order in zip(each(inputs), each(targets), orders)]
    sums = [torch.zeros(3, dtype=torch.float64, device=device) for _ in states]  # client.local_train's
    methods = {name: MethodCall(model, name) for name in ("text_inputs", "text_from", "loss")}
    call = lambda i, method, *args, **kwargs: functional_call(methods[method], states[i], args, kwargs)
    for step in range(max(map(len, orders))):
        active = [i for i, order in enumerate(orders) if step < len(order)]
        prompts = [call(i, "text_inputs") for i in active]  # each (embeddings, eot)
        stacked = [torch.cat(column) for column in zip(*prompts)]
        encoded = encode(*stacked).chunk(len(active))  # one encoder call
        losses = []
        for i, features in zip(active, encoded):
            batch_inputs, batch_targets = next(loaders[i])
            T = call(i, "text_from", features)
            losses.append((i, call(i, "loss", batch_inputs, batch_targets, loss_fn, T=T), len(batch_targets)))
            optimizers[i].zero_grad()
        torch.stack([loss for _, loss, _ in losses]).sum().backward()
        for i, loss, n in losses:
            sums[i] += clip_and_step(optimizers[i], list(states[i].values()), cfg.grad_clip, loss, n)
    return [({name[len("model."):]: t.detach().clone() for name, t in state.items()}, len(rows),
             step_stats(total, len(order), len(rows) * cfg.local_epochs))
            for state, rows, total, order in zip(states, client_rows, sums, orders)]


class MethodCall(torch.nn.Module):
    """A model's method as a module call: torch.func.functional_call runs a module's forward with
    other tensors in place of its parameters (here a client's own)."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)
