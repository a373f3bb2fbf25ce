"""Paths that only make a run faster, beside the method and chosen by an option; each equals the
plain path it replaces (tests/test_speed.py). They import the method, never the reverse.

    shared_prefix.py     --text-encoding shared (auto on CUDA): each prompt prefix through CLIP's
                         text encoder once (SharedPrefixText wraps a model)
    parallel_clients.py  --parallel-clients N: N clients of a round in one pass (train_together)
    compiled.py          --compile: the training loss compiled, CLIP's blocks batch-first into
                         scaled_dot_product_attention, the Sinkhorn fused (CompiledStep wraps a model)
    fused_sinkhorn.py    ot.sinkhorn with its iterations compiled (what --compile's transport runs)
    lockstep.py          reproduce.py --lockstep N: N cells of a grid in one process, every client of
                         every cell a lane of one pass (run_cells, train_lanes)
"""
from speed.shared_prefix import SharedPrefixText


def with_text_encoding(model, text_encoding: str):
    """The model as --text-encoding asks: itself (whole prompts), or SharedPrefixText(model) with
    `shared`, and with `auto` on CUDA. Methods that change tokens inside the text encoder (deep
    prompts, adapters) keep the whole prompts."""
    shared = text_encoding == "shared" or (text_encoding == "auto" and model.device.type == "cuda")
    return SharedPrefixText(model) if shared and hasattr(model, "text_from") else model


def compiled_step(model):
    """The model with its training loss compiled on fused kernels (--compile: speed/compiled.py,
    imported here so that a run without it never loads torch.compile's machinery)."""
    from speed.compiled import CompiledStep
    return CompiledStep(model)
