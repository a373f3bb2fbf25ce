"""What one client does in a round: E local epochs of SGD on its own images, from the global
tunable state (`local_train`, which both engines run: federate.py and flower_app.py).

    for each epoch, each batch of its rows in a fresh seeded order:
        loss = model.loss(frozen inputs of the batch, their labels)
        backward; clip the gradient norm at --grad-clip (a guard); SGD step

Its batches come from the frozen inputs in the feature store (memory-mapped float16 or uint8),
gathered by index on the host and moved to the device as float32.
"""
from concurrent.futures import ThreadPoolExecutor

import torch

from fedmpt import LOSSES


def local_train(model, global_state, inputs, targets, indices, cfg, lr, generator):
    """One client's update: copy the global state, E epochs of SGD on the client's images
    (`inputs`: the tuple of cached tensors `model.encode_images` made, e.g. (v, P)).
    Returns (state, n_samples, stats), stats = {"loss": mean loss per image, "steps": local
    steps, "clip_share": share of steps whose gradient norm exceeded --grad-clip (0 with
    --grad-clip 0), "grad_norm": mean gradient norm before clipping}. The optimizer starts
    fresh every round, so nothing of it outlives the round (nor needs a checkpoint)."""
    model.load_tunable_state(global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, loss_fn = local_optimizer(params, lr), LOSSES[cfg.loss]
    totals = StepTotals(model.device)
    for batch_inputs, batch_targets in batches(inputs, targets, client_order(indices, cfg, generator), model.device):
        loss = model.loss(batch_inputs, batch_targets, loss_fn)
        optimizer.zero_grad()
        loss.backward()
        totals.add(loss, clip_and_step(optimizer, params, cfg.grad_clip), len(batch_targets), cfg.grad_clip)
    return model.tunable_state(), len(indices), totals.stats()


def local_optimizer(params, lr):
    """A client's SGD for one round (momentum 0.9, weight decay 1e-5): every training path's."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5)


def clip_and_step(optimizer, params, grad_clip) -> torch.Tensor:
    """The gradient-norm guard and the SGD step; returns the norm before clipping (a device
    tensor: reading it here would stop a GPU to wait for the host)."""
    if grad_clip > 0:  # a guard: the first steps from random contexts can be large
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # the norm before clipping
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    return norm


class StepTotals:
    """A client's training numbers, summed on the device in float64 and read once, after its last step."""

    def __init__(self, device):
        self.loss, self.norms, self.clipped = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
        self.seen, self.steps = 0, 0

    def add(self, loss, norm, n_images, grad_clip):
        norm = norm.detach().double()
        self.loss += loss.detach().double() * n_images
        self.norms += norm
        self.clipped += (norm > grad_clip).double() if grad_clip > 0 else 0.0
        self.seen, self.steps = self.seen + n_images, self.steps + 1

    def stats(self) -> dict:
        loss, norms, clipped = (float(t) for t in (self.loss, self.norms, self.clipped))  # the one host sync
        steps = max(self.steps, 1)
        return {"loss": loss / max(self.seen, 1), "steps": self.steps, "clip_share": clipped / steps,
                "grad_norm": norms / steps}


def client_order(indices, cfg, generator) -> list:
    """A client's batches of rows for its E local epochs, each epoch in a fresh order drawn from its generator."""
    indices = torch.as_tensor(indices)
    return [batch for _ in range(cfg.local_epochs)
            for batch in indices[torch.randperm(len(indices), generator=generator)].split(cfg.batch_size)]


def batches(inputs, targets, order, device, prefetch=None):
    """(inputs, targets) of each batch of rows in `order` on the device (`gather`); on CUDA (or
    with prefetch=True) a thread gathers the next batch while the current one trains."""
    prefetch = torch.device(device).type == "cuda" if prefetch is None else prefetch
    if not prefetch:
        for rows in order:
            yield gather(inputs, rows, device), targets[rows].to(device)
        return
    load = lambda rows: (gather(inputs, rows, device), targets[rows].to(device, non_blocking=True))
    with ThreadPoolExecutor(max_workers=1) as pool:
        coming = pool.submit(load, order[0]) if order else None
        for i in range(len(order)):
            batch = coming.result()
            coming = pool.submit(load, order[i + 1]) if i + 1 < len(order) else None
            yield batch


def gather(inputs, rows, device) -> list:
    """The frozen inputs of a batch of rows on the device, as float32: by index_select (an 8x
    faster gather than x[rows] on a memory map), on the way to a GPU straight into pinned
    memory: one copy on the host, one to the device. A slice of rows is read as a view."""
    cuda = torch.device(device).type == "cuda"
    batch = []
    for x in inputs:
        if isinstance(rows, slice):
            part = x[rows]  # a view: copied once, to the device or to float32
        else:
            part = torch.empty((len(rows), *x.shape[1:]), dtype=x.dtype, pin_memory=cuda)
            torch.index_select(x, 0, torch.as_tensor(rows, dtype=torch.long), out=part)
        batch.append(part.to(device, non_blocking=cuda).float())
    return batch
