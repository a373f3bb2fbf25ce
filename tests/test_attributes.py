"""FedMVP's shipped class attribute descriptions (baselines/attributes/<dataset>.json): every
dataset has a file that covers each of its classes with sentences of its own."""
import json
from pathlib import Path

import pytest

import data
from baselines.fedmvp import ATTRIBUTES_DIR, load_attributes

# The aerial datasets read their classes from the label files; these are the published headers.
MULTISCENE = ["Apron", "BaseballField", "BasketballField", "Beach", "Bridge", "Cemetery", "Commercial",
              "Farmland", "Woodland", "GolfCourse", "Greenhouse", "Helipad", "LakePond", "OilFiled",
              "Orchard", "ParkingLot", "Park", "Pier", "Port", "Quarry", "Railway", "Residential", "River",
              "Roundabout", "Runway", "Soccer", "SolarPannel", "SparseShrub", "Stadium", "StorageTank",
              "TennisCourt", "TrainStation", "WastewaterPlant", "WindTrubine", "Works", "Sea"]
MLRSNET = ["airplane", "airport", "bare soil", "baseball diamond", "basketball court", "beach", "bridge",
           "buildings", "cars", "chaparral", "cloud", "containers", "crosswalk", "dense residential area",
           "desert", "dock", "factory", "field", "football field", "forest", "freeway", "golf course", "grass",
           "greenhouse", "gully", "habor", "intersection", "island", "lake", "mobile home", "mountain",
           "overpass", "park", "parking lot", "parkway", "pavement", "railway", "railway station", "river",
           "road", "roundabout", "runway", "sand", "sea", "ships", "snow", "snowberg",
           "sparse residential area", "stadium", "swimming pool", "tanks", "tennis court", "terrace", "track",
           "trail", "transmission tower", "trees", "water", "wetland", "wind turbine"]
CLASSES = {**{name: data.known_classes(name) for name in data.DATASETS if data.known_classes(name)},
           "multiscene": MULTISCENE, "mlrsnet": MLRSNET}


def test_class_lists_are_complete():
    assert sorted(CLASSES) == sorted(d for d in data.DATASETS if d != "folder")
    assert len(MULTISCENE) == len(set(MULTISCENE)) == 36 and len(MLRSNET) == len(set(MLRSNET)) == 60


@pytest.mark.parametrize("dataset", sorted(CLASSES))
def test_shipped_file_covers_every_class_with_its_own_sentences(dataset):
    classes = CLASSES[dataset]
    loaded = load_attributes(dataset, classes)
    assert loaded["source"] == "default" and loaded["file"] == str(ATTRIBUTES_DIR / f"{dataset}.json")
    shipped = json.loads(Path(loaded["file"]).read_text())
    assert shipped["dataset"] == dataset and list(shipped["attributes"]) == classes  # no extra class
    assert shipped["note"].strip()  # how the file was made
    sentences = loaded["attributes"]
    assert all(len(sentences[c]) == len(set(sentences[c])) == 3 for c in classes)
    lists = [tuple(sentences[c]) for c in classes]
    assert len(set(lists)) == len(lists)  # no two classes share their descriptions


def test_a_dataset_without_a_file_gets_templates():
    loaded = load_attributes("folder", ["red fox", "OilFiled"])
    assert loaded["source"] == "template" and loaded["attributes"]["OilFiled"][0] == "a photo of a oil field."


def test_every_aerial_class_has_a_readable_prompt_name():
    names = [data.prompt_name(c) for c in MULTISCENE + MLRSNET]
    assert all(n == n.lower() and "_" not in n for n in names)
    assert {"solar panel", "wind turbine", "oil field", "harbor", "lake pond", "sparse shrub"} <= set(names)
