"""Small synthetic copies of the SSL-transfer study's medical datasets, in their on-disk layouts
as downloaded (the study's readme and dataset classes; docs/transfer-study.md, "Datasets as
downloaded").

Each ``write_*(root, bad=False)`` writes a few 32-px images with the dataset's CSV(s) and file
names, and returns ``{image file name: expected label after the study's rules}`` for the rows
the reader must keep. ``bad=True`` adds the bad rows the reader must name (a missing image, an
unknown label, an unreadable file), listed under the key ``"bad"`` as ``[text the error must
contain]``. Everything is deterministic.
"""
import csv
import os

import numpy as np
from PIL import Image


def image(path, seed, grey=False, size=32):
    """A 32-px image (grey for X-rays) at ``path``, format from the extension."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = (size, size) if grey else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def write_chexpert(root, bad=False):
    """``CheXpert-v1.0/{train,valid}.csv`` + ``CheXpert-v1.0/{train,valid}/patientN/studyM/viewK_*.jpg``.
    Pleural Effusion values 1.0, 0.0, blank and -1.0 (uncertain; expected label 1 = U-Ones)."""
    base = os.path.join(root, "CheXpert-v1.0")
    values = ["1.0", "0.0", "", "-1.0", "1.0", "0.0", "0.0", "1.0"]
    expected, train_rows = {}, []
    for p, value in enumerate(values, start=1):
        for view in ("view1_frontal", "view2_lateral"):
            rel = f"CheXpert-v1.0/train/patient{p:05d}/study1/{view}.jpg"
            image(os.path.join(root, rel), p * 10 + len(view), grey=True)
            row = [rel, "Female", "60", "Frontal" if "frontal" in view else "Lateral", "AP"] + [""] * 14
            row[CHEXPERT_HEADER.index("Pleural Effusion")] = value
            row[CHEXPERT_HEADER.index("Cardiomegaly")] = "1.0"  # another finding: no effect (many-to-one)
            train_rows.append(row)
            expected[rel] = 1 if value in ("1.0", "-1.0") else 0
    valid_rows = []
    for p, value in ((64541, "1.0"), (64542, "0.0")):
        rel = f"CheXpert-v1.0/valid/patient{p}/study1/view1_frontal.jpg"
        image(os.path.join(root, rel), p, grey=True)
        row = [rel, "Male", "50", "Frontal", "PA"] + ["0.0"] * 14
        row[CHEXPERT_HEADER.index("Pleural Effusion")] = value
        valid_rows.append(row)
        expected[rel] = int(value == "1.0")
    if bad:
        missing = ["CheXpert-v1.0/train/patient00099/study1/view1_frontal.jpg", "M", "1", "Frontal", "AP"] + [""] * 14
        odd = list(train_rows[0])
        odd[CHEXPERT_HEADER.index("Pleural Effusion")] = "2.0"
        train_rows += [missing, odd]
        expected["bad"] = ["patient00099", "unknown Pleural Effusion label '2.0'"]
    _csv(os.path.join(base, "train.csv"), CHEXPERT_HEADER, train_rows)
    _csv(os.path.join(base, "valid.csv"), CHEXPERT_HEADER, valid_rows)
    return expected


CHESTX_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                 "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]


def write_chestxray14(root, bad=False):
    """``Data_Entry_2017.csv`` + ``images/*.png``: kept = single findings of the 7 classes."""
    findings = ["Cardiomegaly", "Cardiomegaly|Emphysema", "No Finding", "Effusion", "Pneumonia", "Atelectasis",
                "Pneumothorax", "Mass", "Nodule", "Infiltration", "Hernia", "Effusion", "Mass", "Atelectasis"]
    classes = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax"]
    rows, expected = [], {}
    for i, f in enumerate(findings):
        name = f"{i // 2 + 1:08d}_{i % 2:03d}.png"  # two images per patient
        image(os.path.join(root, "images", name), i, grey=True)
        rows.append([name, f, str(i % 2), str(i // 2 + 1), "58", "M", "PA", "2682", "2749", "0.143", "0.143", ""])
        if f in classes:
            expected[name] = classes.index(f)
    if bad:
        rows.append(["00000099_000.png", "Effusion", "0", "99", "40", "F", "AP", "1", "1", "0.1", "0.1", ""])
        rows.append(["00000001_000.png", "Covid", "0", "1", "40", "F", "AP", "1", "1", "0.1", "0.1", ""])
        expected["bad"] = ["00000099_000.png", "unknown finding 'Covid'"]
    _csv(os.path.join(root, "Data_Entry_2017.csv"), CHESTX_HEADER, rows)
    return expected


def _write_tb(root, csv_name, folder, prefix, findings, bad):
    rows, expected = [], {}
    for i, f in enumerate(findings):
        name = f"{prefix}_{i + 1:04d}_{int(f != 'normal')}.png"
        image(os.path.join(root, *folder, name), i, grey=True)
        rows.append([name, "Male" if i % 2 else "Female", str(30 + i), f])
        expected[name] = int(f != "normal")
    if bad:
        rows += [[f"{prefix}_0999_0.png", "Male", "40", "normal"], [f"{prefix}_0001_0.png", "Male", "40", ""]]
        expected["bad"] = [f"{prefix}_0999_0.png", "no findings"]
    _csv(os.path.join(root, csv_name), ["study_id", "sex", "age", "findings"], rows)
    return expected


def write_montgomery(root, bad=False):
    """``montgomery_metadata.csv`` (study_id, sex, age, findings) + ``MontgomerySet/CXR_png/``."""
    findings = ["normal", "normal", "right upper lobe TB", "normal", "bilateral tuberculosis", "normal", "TB"]
    return _write_tb(root, "montgomery_metadata.csv", ("MontgomerySet", "CXR_png"), "MCUCXR", findings, bad)


def write_shenzhen(root, bad=False, csv_name="shenzhen_metadata.csv"):
    """``shenzhen_metadata.csv`` + ``ChinaSet_AllFiles/CXR_png/`` (findings such as ``STB,1yr``)."""
    findings = ["normal", "STB,1yr", "normal", "PTB in the left upper field", "normal", "normal", "secondary PTB"]
    return _write_tb(root, csv_name, ("ChinaSet_AllFiles", "CXR_png"), "CHNCXR", findings, bad)


def write_eyepacs(root, bad=False, test=True):
    """``trainLabels.csv`` (image,level) + ``train/*.jpeg``; ``testLabels.csv`` (image,level,Usage) + ``test/``."""
    expected, rows = {}, []
    levels = [0, 0, 2, 1, 4, 3, 0, 0, 1, 2, 3, 4, 0, 2]
    for i, level in enumerate(levels):
        name = f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}"
        image(os.path.join(root, "train", name + ".jpeg"), i)
        rows.append([name, str(level)])
        expected[name + ".jpeg"] = level
    if bad:
        rows += [["99_left", "0"], ["10_left", "5"]]
        expected["bad"] = ["99_left.jpeg", "unknown level '5'"]
    _csv(os.path.join(root, "trainLabels.csv"), ["image", "level"], rows)
    if test:
        trows = []
        for i, level in enumerate([0, 3]):
            name = f"{1 + i}_left"
            image(os.path.join(root, "test", name + ".jpeg"), 100 + i)
            trows.append([name, str(level), "Public"])
            expected[name + ".jpeg"] = level
        _csv(os.path.join(root, "testLabels.csv"), ["image", "level", "Usage"], trows)
    return expected


def write_ichallenge_amd(root, bad=False):
    """``Training400/AMD/A*.jpg`` (positive) and ``Training400/Non-AMD/N*.jpg``."""
    expected = {}
    for i in range(3):
        expected[os.path.basename(image(os.path.join(root, "Training400", "AMD", f"A{i + 1:04d}.jpg"), i))] = 1
    for i in range(5):
        expected[os.path.basename(image(os.path.join(root, "Training400", "Non-AMD", f"N{i + 1:04d}.jpg"), 10 + i))] = 0
    if bad:
        image(os.path.join(root, "Training400", "Non-AMD", "A0099.jpg"), 99)
        expected["bad"] = ["A0099.jpg"]
    return expected


def write_ichallenge_pm(root, bad=False):
    """``PALM-Training400/PALM-Training400/{H,N,P}*.jpg``: H and P positive, N negative."""
    expected, folder = {}, os.path.join(root, "PALM-Training400", "PALM-Training400")
    for letter, n, label in (("H", 2, 1), ("N", 4, 0), ("P", 3, 1)):
        for i in range(n):
            expected[os.path.basename(image(os.path.join(folder, f"{letter}{i + 1:04d}.jpg"), ord(letter) + i))] = label
    if bad:
        image(os.path.join(folder, "X0001.jpg"), 7)
        expected["bad"] = ["X0001.jpg"]
    return expected


def write_bach(root, bad=False):
    """``ICIAR2018_BACH_Challenge/Photos/{Normal,Benign,InSitu,Invasive}/*.tif`` (+ its ground-truth CSV)."""
    base = os.path.join(root, "ICIAR2018_BACH_Challenge", "Photos")
    expected, truth = {}, []
    for label, (name, prefix) in enumerate((("Normal", "n"), ("Benign", "b"), ("InSitu", "is"), ("Invasive", "iv"))):
        for i in range(2):
            file = f"{prefix}{i + 1:03d}.tif"
            image(os.path.join(base, name, file), label * 10 + i)
            expected[file] = label
            truth.append([file, name])
    with open(os.path.join(base, "microscopy_ground_truth.csv"), "w", newline="") as f:
        csv.writer(f).writerows(truth)  # no header, as released
    if bad:
        with open(os.path.join(base, "Benign", "b099.tif"), "wb") as f:
            f.write(b"not a tiff")
        expected["bad"] = ["b099.tif"]
    return expected


def write_csv_set(root, labels, bad=False, grey=False):
    """``root/images/img{i}.png`` and ``root/labels.csv`` (``path,label,patient``) with ``labels``
    (strings; two images per patient)."""
    rows, expected = [], {}
    for i, label in enumerate(labels):
        rel = f"images/img{i}.png"
        image(os.path.join(root, rel), i, grey=grey)
        rows.append([rel, label, f"p{i // 2}"])
        expected[rel] = label
    if bad:
        rows += [["images/missing.png", labels[0], "p99"], ["images/img0.png", "", "p0"]]
        expected["bad"] = ["missing.png", "unknown label ''"]
    _csv(os.path.join(root, "labels.csv"), ["path", "label", "patient"], rows)
    return expected
