"""The small CLIP of the offline world: its architecture (one definition), and the shipped
weights (shapes/weights/shapes_clip.pt, trained by `python -m shapes.pretrain`).

The weights ship in fp16 without the token embedding rows no caption touched: those keep their
seeded initial values, so `load_shapes_clip` rebuilds them from the seed. The file's sha256 is
recorded beside it (shapes_clip.json) and checked on every load.
"""
import hashlib
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised inside clip
import clip  # noqa: E402
import torch  # noqa: E402

from errors import FedMPTError  # noqa: E402
from shapes.world import SIZE  # noqa: E402

# In the order of backbone.ARCHITECTURES: (embed_dim, image_resolution, vision_layers,
# vision_width, vision_patch_size, context_length, vocab_size, transformer_width,
# transformer_heads, transformer_layers). 96 px through the ResNet (stride 32): a 3x3 grid,
# N = 9 region tokens, one per cell of the world's grid.
SHAPES_ARCHITECTURE = (128, SIZE, (1, 1, 1, 1), 16, None, 48, 49408, 128, 4, 2)
WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_clip.pt"


def new_model(seed: int) -> clip.model.CLIP:
    """The architecture with CLIP's seeded initialisation, float32 (not build_model's fp16)."""
    with torch.random.fork_rng():  # leave the caller's random state alone
        torch.manual_seed(seed)
        return clip.model.CLIP(*SHAPES_ARCHITECTURE)


def save_weights(model: clip.model.CLIP, path, seed: int) -> str:
    """fp16 state without the token embedding rows that kept their initial value; returns sha256."""
    state = {name: (t.half() if t.is_floating_point() else t) for name, t in model.state_dict().items()}
    embedding = state.pop("token_embedding.weight")
    initial = new_model(seed).token_embedding.weight.detach().half()
    rows = torch.nonzero((embedding != initial).any(dim=1)).flatten()
    torch.save({"seed": seed, "architecture": SHAPES_ARCHITECTURE, "state": state,
                "token_rows": rows, "token_embedding_rows": embedding[rows].clone()}, path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_shapes_clip(path=None) -> clip.model.CLIP:
    """The shipped shapes CLIP: float32, eval mode, CPU. Checks the file against the sha256
    recorded beside it (PATH with .json) and raises FedMPTError when either is missing or they differ."""
    path = Path(path or WEIGHTS)
    record = path.with_suffix(".json")
    if not path.is_file() or not record.is_file():
        missing = path if not path.is_file() else record
        raise FedMPTError(f"shapes CLIP weights not found: {missing} is missing. "
                          "Restore both files from the repository (git checkout -- shapes/weights/), or make "
                          "them with `python -m shapes.pretrain`.")
    expected = json.loads(record.read_text())["sha256"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise FedMPTError(f"{path} has sha256 {digest}, but {record} records {expected}: the file is "
                          "damaged or from another run. Restore both from the repository, or run "
                          "`python -m shapes.pretrain` again.")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = new_model(saved["seed"])
    state = {name: t.float() if t.is_floating_point() else t for name, t in saved["state"].items()}
    embedding = model.token_embedding.weight.detach().clone()
    embedding[saved["token_rows"]] = saved["token_embedding_rows"].float()
    model.load_state_dict({**state, "token_embedding.weight": embedding})
    return model.float().eval()
