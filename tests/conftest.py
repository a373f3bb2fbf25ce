import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """The offline shapes world, generated once per test session in the VOC layout."""
    from shapes import world as shapes
    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_shapes_dataset(root)
    return root


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """The feature store of this test session (never ~/.cache): runs, and the processes they
    start, find it in $FEDMPT_CACHE."""
    import os
    path = tmp_path_factory.mktemp("feature-cache")
    previous, os.environ["FEDMPT_CACHE"] = os.environ.get("FEDMPT_CACHE"), str(path)
    yield path
    if previous is None:
        del os.environ["FEDMPT_CACHE"]
    else:
        os.environ["FEDMPT_CACHE"] = previous


def build_experiment(cfg, model_cfg):
    """A whole experiment as setup builds it, without a run directory (nothing written but the
    feature store): resolved options, data, clients, model, the frozen inputs of the training
    and test images, the reference scores."""
    import experiment
    exp = experiment.prepare(*experiment.resolve(cfg, model_cfg))
    exp.train = experiment.training_inputs(exp)
    experiment.test_side(exp)
    return exp
