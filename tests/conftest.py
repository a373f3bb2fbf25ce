import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """The offline shapes world, generated once per test session in the VOC layout."""
    from shapes import world as shapes
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_shapes_dataset(root)
    return root
