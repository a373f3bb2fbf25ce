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
    order = client_order(indices, cfg, generator)
    sums = torch.zeros(3, dtype=torch.float64, device=model.device)  # clip_and_step's numbers, summed on the device
    for batch_inputs, batch_targets in batches(inputs, targets, order, model.device):
        loss = model.loss(batch_inputs, batch_targets, loss_fn)
        optimizer.zero_grad()
        loss.backward()
        sums += clip_and_step(optimizer, params, cfg.grad_clip, loss, len(batch_targets))
    return model.tunable_state(), len(indices), step_stats(sums, len(order), len(indices) * cfg.local_epochs)


def local_optimizer(params, lr):
    """A client's SGD for one round (momentum 0.9, weight decay 1e-5): every training path's."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5)


def clip_and_step(optimizer, params, grad_clip, loss, n_images) -> torch.Tensor:
    """The gradient-norm guard and the SGD step. Returns the step's numbers for step_stats, in
    float64 on the device (reading them here would stop a GPU to wait for the host): (the batch's
    loss x its images, the gradient norm before clipping, 1 if the guard clipped it else 0)."""
    if grad_clip > 0:  # a guard: the first steps from random contexts can be large
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # the norm before clipping
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    norm = norm.detach().double()
    return torch.stack([loss.detach().double() * n_images, norm, (norm > grad_clip).double() * (grad_clip > 0)])


def step_stats(sums: torch.Tensor, steps: int, seen: int) -> dict:
    """A client's training numbers from its steps' clip_and_step numbers summed (read once, after
    its last step): the loss per image, the share of steps clipped, the mean gradient norm."""
    loss, norms, clipped = sums.tolist()  # the one host sync
    return {"loss": loss / max(seen, 1), "steps": steps, "clip_share": clipped / max(steps, 1),
            "grad_norm": norms / max(steps, 1)}


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
