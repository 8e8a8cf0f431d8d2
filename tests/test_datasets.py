"""Dataset readers, checks and the ``tbps data`` CLI on tiny fixture files in every supported format."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tbps.cli.data import app
from tbps.data.checks import check_dataset, dataset_stats
from tbps.data.readers import DATASET_NAMES, load_dataset
from tbps.data.records import (
    DataFormatError,
    ImageLoadError,
    ImageRecord,
    LoadReport,
    PersonSearchDataset,
    load_image,
    normalize_caption,
)

runner = CliRunner()


def _cuhk_records() -> list[dict]:
    return [
        {"split": "train", "captions": ["A man in a red\nshirt.", "He  wears   black shoes. "],
         "file_path": "CUHK01/0001001.png", "processed_tokens": [["a"]], "id": 1},
        {"split": "train", "captions": ["The man wears a red shirt.His pants are blue.", "Red top."],
         "file_path": "CUHK01/0001002.png", "processed_tokens": [], "id": 1},
        {"split": "train", "captions": ["A woman with a bag.", "Long hair.", "White sneakers."],
         "file_path": "Market/0002_c1s1_000151_01.jpg", "processed_tokens": [], "id": 2},
        {"split": "val", "captions": ["A boy in green.", "   "],
         "file_path": "cam_a/003_45.bmp", "processed_tokens": [], "id": 3},
        {"split": "val", "captions": ["Green jacket boy.", "Boy with jacket."],
         "file_path": "cam_b/003_90.bmp", "processed_tokens": [], "id": 3},
        {"split": "test", "captions": ["An old man with a cane.", "Grey coat."],
         "file_path": "test_query/p4_s1.jpg", "processed_tokens": [], "id": 4},
        {"split": "test", "captions": ["", "\n"],
         "file_path": "test_query/p4_s2.jpg", "processed_tokens": [], "id": 4},
    ]


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_images(root: Path, records: list[ImageRecord], size: tuple[int, int] = (16, 32)) -> None:
    for record in records:
        record.image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (120, 30, 200)).save(record.image_path)


# --------------------------------------------------------------------------- captions and images


def test_normalize_caption_fixes_whitespace_and_glued_sentences() -> None:
    assert normalize_caption("  A man\nin a  red\tshirt.His pants  ") == "A man in a red shirt. His pants"
    assert normalize_caption("He is from the U.S.A. today.") == "He is from the U.S.A. today."
    assert normalize_caption(" \n ") == ""


def test_load_image_rgb_and_errors(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 12), 100).save(gray)
    image = load_image(gray)
    assert image.mode == "RGB" and image.size == (8, 12)

    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageLoadError, match="garbage.jpg"):
        load_image(garbage)
    full = tmp_path / "full.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(truncated)


def test_load_report_keeps_first_examples_only() -> None:
    report = LoadReport(max_examples=2)
    for i in range(4):
        report.add("caption_normalised", f"example {i}")
    assert report.counts == {"caption_normalised": 4}
    assert report.examples["caption_normalised"] == ["example 0", "example 1"]


# --------------------------------------------------------------------------- benchmark readers


@pytest.mark.parametrize("file_name", ["caption_all.json", "reid_raw.json"])
def test_cuhk_pedes_both_file_names(tmp_path: Path, file_name: str) -> None:
    _write_json(tmp_path / file_name, _cuhk_records())
    ds = load_dataset("cuhk-pedes", tmp_path)
    assert ds.name == "cuhk-pedes"
    assert list(ds.splits) == ["train", "val", "test"]
    train = ds.split("train")
    assert [r.person_id for r in train] == [1, 1, 2]  # 1-based ids kept as written
    assert train[0].captions == ("A man in a red shirt.", "He wears black shoes.")
    assert train[1].captions[0] == "The man wears a red shirt. His pants are blue."
    assert len(train[2].captions) == 3
    assert train[2].image_path == tmp_path.resolve() / "imgs" / "Market" / "0002_c1s1_000151_01.jpg"
    assert train[2].relative_path == "Market/0002_c1s1_000151_01.jpg"
    # The val record lost its blank caption; the test record with only blank captions is skipped.
    assert ds.split("val")[0].captions == ("A boy in green.",)
    assert len(ds.split("test")) == 1
    assert ds.report.counts["empty_caption_dropped"] == 3
    assert ds.report.counts["record_skipped_no_caption"] == 1
    assert ds.report.counts["caption_normalised"] >= 3


def test_split_keyerror_lists_available(tmp_path: Path) -> None:
    _write_json(tmp_path / "reid_raw.json", _cuhk_records()[:3])
    ds = load_dataset("CUHK_PEDES", tmp_path)
    with pytest.raises(KeyError, match="available splits: train"):
        ds.split("test")


def test_icfg_carves_identity_disjoint_val(tmp_path: Path) -> None:
    records = []
    for person_id in range(20):  # 0-based ids, train only
        for shot in range(2):
            records.append({"split": "train", "captions": [f"Person {person_id} shot {shot}."],
                            "file_path": f"train/{person_id:04d}/{shot}.jpg", "processed_tokens": [],
                            "id": person_id})
    records.append({"split": "test", "captions": ["Test person."], "file_path": "test/0100/0.jpg",
                    "processed_tokens": [], "id": 100})
    _write_json(tmp_path / "ICFG-PEDES.json", records)

    ds = load_dataset("icfg-pedes", tmp_path, val_identity_fraction=0.2, seed=3)
    train_ids = {r.person_id for r in ds.split("train")}
    val_ids = {r.person_id for r in ds.split("val")}
    assert len(val_ids) == 4 and len(train_ids) == 16
    assert not train_ids & val_ids
    assert 0 in train_ids | val_ids
    assert all(r.split == "val" for r in ds.split("val"))
    assert any("carved" in note for note in ds.notes)

    again = load_dataset("icfg-pedes", tmp_path, val_identity_fraction=0.2, seed=3)
    assert {r.person_id for r in again.split("val")} == val_ids
    other = {frozenset(r.person_id for r in load_dataset("icfg-pedes", tmp_path, seed=s).split("val"))
             for s in range(6)}
    assert len(other) > 1  # the seed matters


def test_icfg_alternative_file_name(tmp_path: Path) -> None:
    _write_json(tmp_path / "ICFG_PEDES.json", [
        {"split": "train", "captions": ["One."], "file_path": "a.jpg", "processed_tokens": [], "id": 0},
        {"split": "train", "captions": ["Two."], "file_path": "b.jpg", "processed_tokens": [], "id": 1},
    ])
    ds = load_dataset("icfg-pedes", tmp_path, val_identity_fraction=0.5)
    assert len(ds.split("train")) == 1 and len(ds.split("val")) == 1


def test_rstpreid_uses_img_path(tmp_path: Path) -> None:
    _write_json(tmp_path / "data_captions.json", [
        {"id": 7, "img_path": "0007_c14_0031.jpg", "captions": ["A man.", "A  tall man."], "split": "train"},
        {"id": 8, "img_path": "0008_c5_0002.jpg", "captions": ["A woman.", "She walks."], "split": "test"},
    ])
    ds = load_dataset("rstpreid", tmp_path)
    assert ds.split("train")[0].image_path == tmp_path.resolve() / "imgs" / "0007_c14_0031.jpg"
    assert ds.split("train")[0].captions == ("A man.", "A tall man.")
    assert dataset_stats(ds) == {"train": {"images": 1, "identities": 1, "captions": 2},
                                 "test": {"images": 1, "identities": 1, "captions": 2}}


def test_wrong_reader_for_file_is_format_error(tmp_path: Path) -> None:
    # An RSTPReid file read as CUHK-PEDES has no file_path in any record.
    _write_json(tmp_path / "reid_raw.json", [{"id": 1, "img_path": "a.jpg", "captions": ["x"], "split": "train"}])
    with pytest.raises(DataFormatError, match="file_path"):
        load_dataset("cuhk-pedes", tmp_path)


def test_malformed_json_names_file(tmp_path: Path) -> None:
    (tmp_path / "reid_raw.json").write_text('[{"id": 1, "split": "train",', encoding="utf-8")
    with pytest.raises(DataFormatError, match="reid_raw.json"):
        load_dataset("cuhk-pedes", tmp_path)


def test_wrong_types_name_record_and_field(tmp_path: Path) -> None:
    records = _cuhk_records()
    records[2]["captions"] = "fine"  # a bare string is accepted as one caption
    records[4]["id"] = [3]
    _write_json(tmp_path / "reid_raw.json", records)
    with pytest.raises(DataFormatError, match=r"record 4.*'id'"):
        load_dataset("cuhk-pedes", tmp_path)
    _write_json(tmp_path / "reid_raw.json", {"not": "a list"})
    with pytest.raises(DataFormatError, match="list"):
        load_dataset("cuhk-pedes", tmp_path)
    records = _cuhk_records()
    records[1]["split"] = "holdout"
    _write_json(tmp_path / "reid_raw.json", records)
    with pytest.raises(DataFormatError, match=r"record 1.*'split'"):
        load_dataset("cuhk-pedes", tmp_path)


def test_missing_annotation_lists_accepted_names(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cuhk-pedes", tmp_path)
    assert "reid_raw.json" in str(info.value) and "caption_all.json" in str(info.value)
    assert str(tmp_path.resolve()) in str(info.value)
    with pytest.raises(FileNotFoundError, match="ICFG_PEDES.json"):
        load_dataset("icfg-pedes", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("rstpreid", tmp_path / "nowhere")


def test_unknown_dataset_lists_known() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("market1501", ".")
    assert all(name in str(info.value) for name in DATASET_NAMES)


# --------------------------------------------------------------------------- generic reader


def test_generic_jsonl_groups_rows_and_maps_string_ids(tmp_path: Path) -> None:
    rows = [
        {"image": "a/1.jpg", "person_id": "bob", "caption": "Bob in blue.", "split": "train", "camera": "c1"},
        {"image": "a/1.jpg", "person_id": "bob", "caption": "Blue  shirt.", "split": "train"},
        {"image": "a/2.jpg", "person_id": "alice", "caption": "Alice with a hat.", "split": "test"},
        {"image": "a/3.jpg", "person_id": "alice", "caption": "", "split": "test"},
    ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    ds = load_dataset("generic", tmp_path)
    (bob,) = ds.split("train")
    assert bob.captions == ("Bob in blue.", "Blue shirt.")
    assert bob.camera == "c1"
    assert bob.image_path == tmp_path.resolve() / "a" / "1.jpg"
    assert ds.person_names == {0: "alice", 1: "bob"}  # sorted, so stable across row orders
    assert bob.person_id == 1 and ds.split("test")[0].person_id == 0
    assert any("alice=0" in note and "bob=1" in note for note in ds.notes)
    assert ds.report.counts["record_skipped_no_caption"] == 1

    # root may point straight at the file
    assert len(load_dataset("generic", tmp_path / "annotations.jsonl")) == 2


def test_generic_csv_without_split_goes_to_test(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "x.png"
    (tmp_path / "annotations.csv").write_text(
        "image,person_id,caption\n"
        'p1.jpg,12,"A man,\nwith a coat."\n'
        "p1.jpg,12,Coat man.\n"
        f"{absolute},5,Someone.\n",
        encoding="utf-8",
    )
    ds = load_dataset("generic", tmp_path)
    assert list(ds.splits) == ["test"]
    first, second = ds.split("test")
    assert first.person_id == 12 and first.captions == ("A man, with a coat.", "Coat man.")
    assert second.image_path == absolute and second.person_id == 5
    assert ds.person_names == {}
    assert any("'test'" in note for note in ds.notes)


def test_generic_malformed_lines_name_line_number(tmp_path: Path) -> None:
    path = tmp_path / "annotations.jsonl"
    path.write_text('{"image": "a.jpg", "person_id": 1, "caption": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 2"):
        load_dataset("generic", tmp_path)
    path.write_text('{"image": "a.jpg", "person_id": 1}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 1.*caption"):
        load_dataset("generic", path)
    path.write_text('{"image": "a.jpg", "person_id": 1, "caption": "x"}\n'
                    '{"image": "a.jpg", "person_id": 2, "caption": "y"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 2.*person_id"):
        load_dataset("generic", path)
    path.unlink()
    csv_path = tmp_path / "annotations.csv"
    csv_path.write_text("image,person_id,caption\na.jpg,1,fine\nb.jpg,2,too,many\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 3"):
        load_dataset("generic", tmp_path)
    csv_path.write_text("image,caption\na.jpg,fine\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="person_id"):
        load_dataset("generic", tmp_path)


# --------------------------------------------------------------------------- checks


def _healthy_cuhk(tmp_path: Path) -> PersonSearchDataset:
    _write_json(tmp_path / "reid_raw.json", _cuhk_records())
    ds = load_dataset("cuhk-pedes", tmp_path)
    _write_images(tmp_path, ds.records)
    return ds


def test_check_healthy_dataset_is_usable(tmp_path: Path) -> None:
    ds = _healthy_cuhk(tmp_path)
    report = check_dataset(ds)
    assert report.usable, report.errors
    assert "missing_image" not in report.issues and "unreadable_image" not in report.issues
    assert report.issues["empty_caption_dropped"] == 3  # from the load report
    # id 4 has a single test image after its blank record was skipped
    assert report.issues["single_image_identity_in_eval"] == 1
    assert report.to_dict()["stats"]["train"] == {"images": 3, "identities": 2, "captions": 7}


def test_check_finds_missing_corrupt_duplicate_and_leak(tmp_path: Path) -> None:
    records = _cuhk_records()
    records.append(dict(records[0]))  # duplicate record of the same image
    records.append({"split": "test", "captions": ["Leaked man."], "file_path": "test_query/leak.jpg",
                    "processed_tokens": [], "id": 2})  # id 2 is also in train
    _write_json(tmp_path / "reid_raw.json", records)
    ds = load_dataset("cuhk-pedes", tmp_path)
    _write_images(tmp_path, ds.records)
    ds.split("train")[1].image_path.unlink()
    ds.split("val")[0].image_path.write_bytes(b"\x00garbage" * 20)

    report = check_dataset(ds, max_examples=2)
    assert report.issues["missing_image"] == 1
    assert report.issues["unreadable_image"] == 1
    assert report.issues["duplicate_record"] == 1
    assert report.issues["identity_in_multiple_splits"] == 1
    assert "0001002.png" in report.examples["missing_image"][0]
    assert not report.usable
    assert any("identity leak" in error for error in report.errors)
    assert any("more than 5%" in error for error in report.errors)

    without_images = check_dataset(ds, check_images=False)
    assert "missing_image" not in without_images.issues
    assert json.loads(json.dumps(without_images.to_dict()))["usable"] is False  # the leak remains


def test_check_split_without_readable_images(tmp_path: Path) -> None:
    ds = _healthy_cuhk(tmp_path)
    for record in ds.split("test"):
        record.image_path.unlink()
    report = check_dataset(ds)
    assert any("split 'test' has no readable image" in error for error in report.errors)


def test_check_empty_dataset_is_unusable(tmp_path: Path) -> None:
    _write_json(tmp_path / "reid_raw.json", [])
    report = check_dataset(load_dataset("cuhk-pedes", tmp_path))
    assert not report.usable and report.errors == ["no records at all"]


# --------------------------------------------------------------------------- CLI


def test_cli_stats_json(tmp_path: Path) -> None:
    _write_json(tmp_path / "caption_all.json", _cuhk_records())
    result = runner.invoke(app, ["stats", "--dataset", "cuhk-pedes", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "train": {"images": 3, "identities": 2, "captions": 7},
        "val": {"images": 2, "identities": 1, "captions": 3},
        "test": {"images": 1, "identities": 1, "captions": 2},
    }
    table = runner.invoke(app, ["stats", "--dataset", "cuhk-pedes", "--root", str(tmp_path)])
    assert table.exit_code == 0 and "identities" in table.stdout


def test_cli_check_exit_codes(tmp_path: Path) -> None:
    ds = _healthy_cuhk(tmp_path)
    ok = runner.invoke(app, ["check", "--dataset", "cuhk-pedes", "--root", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "usable" in ok.stdout

    for record in ds.records:
        record.image_path.unlink()
    bad = runner.invoke(app, ["check", "--dataset", "cuhk-pedes", "--root", str(tmp_path), "--json",
                              "--max-examples", "1"])
    assert bad.exit_code == 1
    payload = json.loads(bad.stdout)
    assert payload["usable"] is False and payload["issues"]["missing_image"] == 6
    assert len(payload["examples"]["missing_image"]) == 1

    skipped = runner.invoke(app, ["check", "--dataset", "cuhk-pedes", "--root", str(tmp_path), "--no-images"])
    assert skipped.exit_code == 0


def test_cli_bad_input_exit_code_2(tmp_path: Path) -> None:
    unknown = runner.invoke(app, ["stats", "--dataset", "nope", "--root", str(tmp_path)])
    assert unknown.exit_code == 2 and "known datasets" in unknown.stderr
    assert unknown.exception is None or isinstance(unknown.exception, SystemExit)
    missing = runner.invoke(app, ["check", "--dataset", "rstpreid", "--root", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    (tmp_path / "data_captions.json").write_text("{oops", encoding="utf-8")
    malformed = runner.invoke(app, ["stats", "--dataset", "rstpreid", "--root", str(tmp_path), "--json"])
    assert malformed.exit_code == 2
    assert malformed.stdout == ""
    assert "data_captions.json" in malformed.stderr and len(malformed.stderr.strip().splitlines()) == 1
    assert "Traceback" not in malformed.output


def test_cli_synth_and_sheet_call_the_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands pass their options through and print the summary; the generator itself is tested elsewhere."""
    calls: dict[str, tuple] = {}

    def generate(out_dir, *, identities, seed, image_size, workers, overwrite):
        calls["generate"] = (Path(out_dir), identities, seed, image_size, workers, overwrite)
        return {"splits": {"train": {"images": 40, "identities": 10}}, "seconds": 1.25}

    def contact_sheet(root, out_png, *, n):
        calls["sheet"] = (Path(root), Path(out_png), n)
        return Path(out_png)

    fake = types.ModuleType("tbps.data.synth")
    fake.generate = generate  # type: ignore[attr-defined]
    fake.contact_sheet = contact_sheet  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tbps.data.synth", fake)

    out = tmp_path / "synthetic"
    result = runner.invoke(app, ["synth", "--out", str(out), "--identities", "10", "--seed", "3",
                                 "--image-height", "64", "--image-width", "32", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert calls["generate"] == (out, 10, 3, (64, 32), 2, True)
    assert "40" in result.stdout and "1.25" in result.stdout

    sheet_png = tmp_path / "sheet.png"
    result = runner.invoke(app, ["sheet", "--root", str(tmp_path), "--out", str(sheet_png), "-n", "4"])
    assert result.exit_code == 0, result.output
    assert calls["sheet"] == (tmp_path, sheet_png, 4)
    missing = runner.invoke(app, ["sheet", "--root", str(tmp_path / "absent"), "--out", str(sheet_png)])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
