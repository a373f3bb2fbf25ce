"""`--plot`: what FedMPT looked at. For a few test images, each condition's transport plan for
the top predicted class, drawn over the image regions, and the gate's weights.

The plan Q (N regions x K conditions) of the positive prompt says how each condition's mass is
spread over the regions; N K Q[:, k] is 1 on every region for a uniform spread, so the colour
scale is shared by all panels. Regions are the backbone's patch grid (3 x 3 for `--clip shapes`).
"""
import math
import textwrap

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from store.files import save_figure  # noqa: E402


CAPTION_WIDTH = 30  # characters of a caption line at fontsize 7 in a 2.1-inch panel


def caption(truth: list, predicted: str, probability: float) -> str:
    """An image panel's title: its true labels, wrapped whole over as many lines as they need,
    then the top prediction."""
    return textwrap.fill(f"true: {', '.join(truth)}", CAPTION_WIDTH) + f"\npred: {predicted} ({probability:.2f})"


def pick_images(targets: torch.Tensor, n: int) -> list:
    """The first n test images with at least two labels (else the first n)."""
    rich = [i for i in range(len(targets)) if int((targets[i] == 1).sum()) >= 2]
    return (rich or list(range(len(targets))))[:n]


@torch.no_grad()
def plot_transport(model, dataset, inputs, conditions, classes, path, n_images=4):
    """Save the picture to `path` and return the per-image numbers it shows."""
    indices = pick_images(dataset.targets, n_images)
    v, P = (x[indices].to(model.device).float() for x in inputs)
    logits, Q, g = model(v, P, plans=True)
    probs = torch.sigmoid(logits).cpu()
    K, side = len(conditions), int(math.isqrt(P.shape[1]))
    figure, axes = plt.subplots(len(indices), K + 2, figsize=(2.1 * (K + 2), 2.2 * len(indices)), squeeze=False)
    transform, dataset.transform = dataset.transform, None  # the picture, not the tensor
    shown = []
    for row, (b, index) in enumerate(zip(range(len(indices)), indices)):
        image = np.asarray(dataset[index][0].convert("RGB"))
        c = int(probs[b].argmax())
        mass = (Q[b, 0, c] * Q.shape[-2] * K).cpu().numpy()  # (N, K): 1 = uniform
        truth = [classes[j] for j in range(len(classes)) if dataset.targets[index, j] == 1]
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(caption(truth, classes[c], float(probs[b, c])), fontsize=7)
        for k in range(K):
            axis = axes[row, 1 + k]
            axis.imshow(image)
            axis.imshow(mass[:, k].reshape(side, side), cmap="magma", alpha=0.6, vmin=0, vmax=mass.max(),
                        extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
            axis.set_title(conditions[k] or "(none)", fontsize=7)
        axes[row, K + 1].barh(range(K), g[b].cpu().numpy(), color="tab:blue")
        axes[row, K + 1].set_yticks(range(K), [c_ or "(none)" for c_ in conditions], fontsize=6)
        axes[row, K + 1].set_xlim(0, 1)
        axes[row, K + 1].set_title("gate", fontsize=7)
        shown.append({"image": index, "class": classes[c], "probability": float(probs[b, c]),
                      "gate": g[b].tolist(), "plan_mass": mass.tolist()})
    dataset.transform = transform
    for axis in axes[:, :K + 1].flat:
        axis.set_xticks([]), axis.set_yticks([])
    figure.suptitle("transport plan of each condition for the top class (bright = more mass)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
    plt.close(figure)
    return shown
