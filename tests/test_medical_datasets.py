"""The SSL-transfer study's medical datasets and ``--dataset csv``: each reader on a synthetic tree
in the dataset's layout as downloaded (``tests/medical_trees.py``): counts, labels after the
study's rules, bad rows named (and skipped with ``--skip-bad-files``), patient-wise splits."""
import os
import sys

import pytest

import eval_transfer
import medical_trees as trees
from gissl import cli
from gissl.data import medical
from gissl.data.datasets import build_classification_datasets
from gissl.errors import DataError, UserError

PRESETS = {  # dataset name: (tree writer, key of a sample in the writer's expected labels)
    "CheXpert": (trees.write_chexpert, lambda p, root: os.path.relpath(p, root).replace(os.sep, "/")),
    "ChestX-ray14": (trees.write_chestxray14, lambda p, root: os.path.basename(p)),
    "MontgomeryCXR": (trees.write_montgomery, lambda p, root: os.path.basename(p)),
    "ShenzhenCXR": (trees.write_shenzhen, lambda p, root: os.path.basename(p)),
    "EyePACS": (trees.write_eyepacs, lambda p, root: os.path.basename(p)),
    "iChallenge_AMD": (trees.write_ichallenge_amd, lambda p, root: os.path.basename(p)),
    "iChallenge_PM": (trees.write_ichallenge_pm, lambda p, root: os.path.basename(p)),
    "BACH": (trees.write_bach, lambda p, root: os.path.basename(p)),
}
CLASSES = {"CheXpert": 2, "ChestX-ray14": 7, "MontgomeryCXR": 2, "ShenzhenCXR": 2, "EyePACS": 5,
           "iChallenge_AMD": 2, "iChallenge_PM": 2, "BACH": 4}


@pytest.mark.parametrize("dataset", sorted(PRESETS))
def test_preset_reader_counts_labels_and_bad_rows(dataset, tmp_path):
    write, key = PRESETS[dataset]
    good = tmp_path / "good"
    expected = write(str(good))
    samples, classes = medical.read_medical(dataset, str(good))
    assert len(classes) == CLASSES[dataset]
    got = {key(s["image"], str(good)): s["label"] for s in samples}
    assert got == expected  # every kept row, each with the study's label, and nothing else
    assert all(s["size"] == (32, 32) for s in samples)

    broken = tmp_path / "bad"
    expected = write(str(broken), bad=True)
    with pytest.raises(DataError) as e:
        medical.read_medical(dataset, str(broken))
    for text in expected.pop("bad"):
        assert text in str(e.value), (text, str(e.value))
    assert "--skip-bad-files" in str(e.value)
    with pytest.warns(UserWarning, match="skipping"):
        samples, _ = medical.read_medical(dataset, str(broken), skip_bad=True)
    assert {key(s["image"], str(broken)): s["label"] for s in samples} == expected


def test_study_label_rules(tmp_path):
    # CheXpert: uncertain -> positive (U-Ones, default), negative, or left out; blank -> negative
    expected = trees.write_chexpert(str(tmp_path / "cx"))
    ones, _ = medical.chexpert(str(tmp_path / "cx"))
    zeros, _ = medical.chexpert(str(tmp_path / "cx"), uncertain="zeros")
    ignored, _ = medical.chexpert(str(tmp_path / "cx"), uncertain="ignore")
    uncertain = [k for k in expected if "patient00004" in k]  # the -1.0 patient
    assert {s["label"] for s in ones if "patient00004" in s["image"]} == {1}
    assert {s["label"] for s in zeros if "patient00004" in s["image"]} == {0}
    assert len(ignored) == len(ones) - len(uncertain) and not any("patient00004" in s["image"] for s in ignored)
    assert {s["label"] for s in ones if "patient00003" in s["image"]} == {0}  # blank
    assert [s["split"] for s in ones].count("test") == 2  # valid.csv is the test split
    # CheXpert in a renamed release folder: paths resolved next to the CSVs
    os.rename(tmp_path / "cx" / "CheXpert-v1.0", tmp_path / "cx" / "chexpert")
    assert len(medical.chexpert(str(tmp_path / "cx" / "chexpert"))[0]) == len(ones)
    # ChestX-ray14 as released, images_0XX/images/ not merged
    expected = trees.write_chestxray14(str(tmp_path / "nih"))
    os.makedirs(tmp_path / "nih" / "images_001")
    os.rename(tmp_path / "nih" / "images", tmp_path / "nih" / "images_001" / "images")
    assert len(medical.chestxray14(str(tmp_path / "nih"))[0]) == len(expected)
    # Shenzhen: the README's file name works too
    trees.write_shenzhen(str(tmp_path / "sz"), csv_name="shenzhencxr_metadata.csv")
    assert len(medical.shenzhen(str(tmp_path / "sz"))[0]) == 7
    with pytest.raises(UserError, match="--chexpert-uncertain"):
        medical.chexpert(str(tmp_path / "cx"), uncertain="half")


def test_csv_label_kinds(tmp_path):
    exp = trees.write_csv_set(str(tmp_path / "bin"), ["0", "1"] * 4)
    samples, classes = medical.csv_labels(str(tmp_path / "bin" / "labels.csv"), kind="binary")
    assert classes == ["0", "1"] and [s["label"] for s in samples] == [int(v) for v in exp.values()]
    # multi-class: sorted names (numerically when integers); ordinal: integer grades 0..K-1
    trees.write_csv_set(str(tmp_path / "multi"), ["polyp", "normal", "ulcer", "normal"])
    samples, classes = medical.csv_labels(str(tmp_path / "multi" / "labels.csv"))
    assert classes == ["normal", "polyp", "ulcer"] and [s["label"] for s in samples] == [1, 0, 2, 0]
    trees.write_csv_set(str(tmp_path / "num"), ["10", "2", "2", "10"])
    assert medical.csv_labels(str(tmp_path / "num" / "labels.csv"))[1] == ["2", "10"]
    trees.write_csv_set(str(tmp_path / "ord"), ["0", "3", "1", "3"])
    samples, classes = medical.csv_labels(str(tmp_path / "ord" / "labels.csv"), kind="ordinal")
    assert classes == ["0", "1", "2", "3"] and [s["label"] for s in samples] == [0, 3, 1, 3]
    order = ("mild", "moderate", "severe")
    trees.write_csv_set(str(tmp_path / "named"), ["severe", "mild", "moderate", "grave"])
    with pytest.raises(DataError, match="line 5: unknown label 'grave'"):
        medical.csv_labels(str(tmp_path / "named" / "labels.csv"), kind="ordinal", classes=order)
    with pytest.raises(DataError, match="no column 'file'.*--path-column"):
        medical.csv_labels(str(tmp_path / "bin" / "labels.csv"), path_column="file")
    with pytest.raises(DataError, match="line 4: unknown label '2' \\(binary"):
        trees.write_csv_set(str(tmp_path / "notbin"), ["0", "1", "2", "1"])
        medical.csv_labels(str(tmp_path / "notbin" / "labels.csv"), kind="binary")


def test_patient_wise_split_and_registry(tmp_path):
    trees.write_csv_set(str(tmp_path / "s"), ["a", "b"] * 10)  # 20 images, 10 patients
    ds, classes = medical.build_medical_datasets("csv", str(tmp_path / "s"), image_size=32,
                                                 labels=str(tmp_path / "s" / "labels.csv"), group_column="patient")
    patients = {name: {os.path.basename(s["image"]) for s in d.samples} for name, d in ds.items()}
    assert sum(len(v) for v in patients.values()) == 20 and [len(ds[n]) for n in ("train", "val", "test")] == [16, 2, 2]
    groups = {name: {s["group"] for s in d.samples} for name, d in ds.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    item = ds["test"][0]
    assert item["image"].shape == (3, 32, 32) and classes == ["a", "b"]
    # a dataset's own test CSV is the test split; the rest splits 8:1 by patient (EyePACS: both eyes together)
    trees.write_eyepacs(str(tmp_path / "e"))
    ds = build_classification_datasets("EyePACS", str(tmp_path / "e"), image_size=32)  # the registry
    assert sorted(os.path.basename(s["image"]) for s in ds["test"].samples) == ["1_left.jpeg", "2_left.jpeg"]
    eyes = [{s["group"] for s in ds[n].samples} for n in ("train", "val")]
    assert not (eyes[0] & eyes[1]) and len(ds["val"]) == 2


def test_eval_transfer_reads_medical_datasets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trees.write_csv_set(str(tmp_path / "s"), ["neg", "pos"] * 6, grey=True)
    argv = ["--architecture", "resnet18", "--image-size", "32", "--workers", "0", "--output-dir", str(tmp_path / "t"),
            "--protocol", "knn"]
    monkeypatch.setattr(sys, "argv", ["eval_transfer.py", "--dataset", "csv", "--labels",
                                      str(tmp_path / "s" / "labels.csv"), "--group-column", "patient"] + argv)
    res = eval_transfer.main(eval_transfer.get_args())
    assert 0 <= res["Accuracy"] <= 1
    for bad, text in ((["--dataset", "csv"], "--labels"), (["--dataset", "CheXpert"], "--data-root"),
                      (["--dataset", "BACH", "--data-root", str(tmp_path)], "class folder missing"),
                      (["--dataset", "csv", "--labels", str(tmp_path / "s" / "labels.csv"), "--split", "stratified"],
                       "split by patient")):
        monkeypatch.setattr(sys, "argv", ["eval_transfer.py"] + bad + argv)
        with pytest.raises(SystemExit) as e:
            cli.run(eval_transfer.main, eval_transfer.get_args)
        assert e.value.code == 2 and text in capsys.readouterr().err, bad


def test_classification_scripts_read_medical_datasets(tmp_path, monkeypatch, capsys):
    """The transfer study's finetune protocol on a medical dataset: train_classification.py with
    --recipe transfer-finetune, then eval_classification.py on the same patient-wise test split."""
    import eval_classification
    import train_classification
    monkeypatch.chdir(tmp_path)
    trees.write_eyepacs(str(tmp_path / "e"))
    common = ["--architecture", "resnet18", "--image-size", "32", "--workers", "0", "--output-dir", str(tmp_path / "t"),
              "--dataset", "EyePACS", "--data-root", str(tmp_path / "e")]
    monkeypatch.setattr(sys, "argv", ["train_classification.py", *common, "--recipe", "transfer-finetune",
                                      "--steps", "4", "--eval-every-steps", "2", "--batch-size", "4"])
    train_classification.main(train_classification.get_args())
    out = capsys.readouterr().out
    test_images = len(build_classification_datasets("EyePACS", str(tmp_path / "e"), image_size=32)["test"])
    assert "EyePACS:" in out and f"/ {test_images} test images, 5 classes" in out
    monkeypatch.setattr(sys, "argv", ["eval_classification.py", *common])
    eval_classification.main(eval_classification.get_args())
    text = (tmp_path / "eval_results.txt").read_text()
    assert f"Test images: {test_images}" in text or f"Test images {test_images}" in text, text
    for bad, msg in ((["--split", "stratified"], "split by patient"), (["--labels", "x.csv"], "--dataset csv only")):
        monkeypatch.setattr(sys, "argv", ["eval_classification.py", *common, *bad])
        with pytest.raises(SystemExit) as e:
            cli.run(eval_classification.main, eval_classification.get_args)
        assert e.value.code == 2 and msg in capsys.readouterr().err, bad
