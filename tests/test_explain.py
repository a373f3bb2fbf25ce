"""--plot's picture (tools/explain.py): its captions are whole."""
import torch
from PIL import Image

from tools import explain

CLASSES = ["square", "triangle", "hexagon", "chevron", "circle"]
CONDITIONS = ["small", "large", "in the center", "on the left", "background"]


class Images:
    """Four test images; each but the first holds four of the classes (long captions)."""
    transform = None
    targets = torch.tensor([[1, 1, 0, 0, 0]] + [[1, 1, 1, 1, 0]] * 3)

    def __getitem__(self, index):
        return Image.new("RGB", (64, 64), (40 * index, 90, 60)), self.targets[index]


class Model:
    """What plot_transport asks of FedMPT: logits, plans (B, 2, C, N, K) and gate (B, K)."""
    device = "cpu"

    def __call__(self, v, P, plans=True):
        B, N, K, C = len(v), P.shape[1], len(CONDITIONS), len(CLASSES)
        return torch.arange(C, dtype=torch.float).repeat(B, 1), torch.full((B, 2, C, N, K), 1 / (N * K)), \
            torch.full((B, K), 1 / K)


def test_plot_captions_are_whole_inside_the_picture(tmp_path, monkeypatch):
    """Every panel title lies inside the saved picture (a title wider than its panel used to run
    off the left edge: ': square, triangle, hexagon, chevron'), and names every true label."""
    figures = []
    monkeypatch.setattr(explain.plt, "close", figures.append)
    inputs = (torch.zeros(4, 8), torch.zeros(4, 9, 8))
    explain.plot_transport(Model(), Images(), inputs, CONDITIONS, CLASSES, tmp_path / "plans.png")
    figure = figures[0]
    renderer, width = figure.canvas.get_renderer(), figure.bbox.width
    titles = [axis.title for axis in figure.axes if axis.get_title()]
    captions = [title.get_text().replace("\n", " ") for title in titles if title.get_text().startswith("true")]
    assert len(captions) == 4 and "true: square, triangle, hexagon, chevron pred:" in captions[1]
    for title in titles:
        extent = title.get_window_extent(renderer)
        assert extent.x0 >= 0 and extent.x1 <= width, title.get_text()
