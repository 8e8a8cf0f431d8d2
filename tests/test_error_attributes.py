"""`benchmarks/error_attributes.py`: which attributes a checkpoint's wrong top-1 results confuse."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import error_attributes  # noqa: E402

from tbps.data.synth import DESCRIBED_ATTRIBUTES  # noqa: E402


def _person(**changes) -> dict:
    base = {key: "x" for key in DESCRIBED_ATTRIBUTES} | {"shoe_colour": "red", "upper_colour": "blue", "lower_colour": "grey"}
    return base | changes


def test_errors_are_classified_by_distance_part_and_whether_the_caption_names_the_colour() -> None:
    attributes = {
        1: _person(),
        2: _person(shoe_colour="black"),  # a sibling one attribute (the feet) away from 1
        3: _person(shoe_colour="black", glasses="y"),  # two away from 1
        4: _person(upper_colour="red", lower_colour="red", carried="y"),  # three away from 1
        5: _person(lower_colour="black"),  # one away from 1, lower body
    }
    queries = [
        (1, "A man in red shoes."),  # right
        (1, "A man in red shoes and a blue shirt."),  # top-1 is 2: shoe colour, named by the caption
        (1, "A man in a blue shirt."),  # top-1 is 2: the caption omits the shoes' colour
        (1, "A man in grey trousers."),  # top-1 is 3: two away
        (1, "Someone."),  # top-1 is 4: three away
        (1, "A man in gray trousers."),  # top-1 is 5: lower colour, named with the other spelling
    ]
    found = [1, 2, 2, 3, 4, 5]
    result = error_attributes.classify_errors(queries, found, attributes)
    assert result["top1_wrong"] == 5
    assert result["R1"] == pytest.approx(100 / 6)
    assert result["wrong_by_distance"] == {"1": 3, "2": 1, "3+": 1}
    assert result["one_attribute_errors_by_part"]["feet"] == 2
    assert result["one_attribute_errors_by_part"]["lower body"] == 1
    assert sum(result["one_attribute_errors_by_part"].values()) == 3
    assert result["one_attribute_errors_by_attribute"] == {"shoe_colour": 2, "lower_colour": 1}
    assert result["one_attribute_colour_errors_the_caption_cannot_resolve"] == 1


def test_analysis_of_a_trained_checkpoint_agrees_with_the_evaluator(search_checkpoint: Path) -> None:
    from tbps.data.readers import val_split_seed
    from tbps.engine.checkpoint import load_method
    from tbps.engine.datamodule import load_configured_dataset
    from tbps.evaluation.evaluator import evaluate_split

    result = error_attributes.analyse(search_checkpoint)
    method, config = load_method(search_checkpoint)
    records = load_configured_dataset(config["data"], val_split_seed(config)).split("test")
    metrics = evaluate_split(method, records, config["data"]["image_size"])
    assert result["R1"] == pytest.approx(float(metrics["R1"]), abs=1e-4)
    assert sum(result["wrong_by_distance"].values()) == result["top1_wrong"]
    assert sum(result["one_attribute_errors_by_part"].values()) == result["wrong_by_distance"]["1"]


def test_data_without_attributes_is_refused(tmp_path: Path) -> None:
    annotation = tmp_path / "reid_raw.json"
    annotation.write_text('[{"id": 1, "split": "test", "file_path": "a.jpg", "captions": ["a"]}]')
    with pytest.raises(SystemExit, match="synthetic data only"):
        error_attributes.identity_attributes(annotation)
