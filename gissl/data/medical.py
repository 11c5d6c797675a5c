"""The SSL-transfer study's medical datasets as downloaded, and any CSV-labelled image set.

Readers (each returns ``(samples, classes)``; a sample is ``{"image": path, "label": int,
"size": (W, H), "group": patient id or None, "split": "test" or None}``; the layouts and
label rules are those of the study's code and readme, docs/transfer-study.md, "Datasets as
downloaded"):

- :func:`csv_labels` -- ``--dataset csv --labels FILE.csv``: one row per image, a path column
  and a label column (binary, multi-class or ordinal), optionally a patient column;
- :func:`chexpert` -- ``CheXpert-v1.0/{train,valid}.csv``, Pleural Effusion positive;
- :func:`chestxray14` -- ``Data_Entry_2017.csv`` + ``images/``, 7 single-finding classes;
- :func:`montgomery`, :func:`shenzhen` -- the TB sets' metadata CSVs, abnormal = positive;
- :func:`eyepacs` -- ``trainLabels.csv`` (``image,level``) + ``train/``, 5 ordinal grades;
- :func:`ichallenge_amd`, :func:`ichallenge_pm` -- labels from the file names;
- :func:`bach` -- ``Photos/<class>/``, 4 ordinal classes.

Every row is checked before any work: a missing or unreadable image, an unknown label or an
empty cell is named (file and line) in one :class:`~gissl.errors.DataError`, or skipped with
one warning under ``skip_bad`` (``--skip-bad-files``), like the other readers.
:func:`build_medical_datasets` splits by patient where the data names patients (80/10/10 of
the patients, or train/val from the training CSV when the dataset has its own test CSV).
"""
import csv
import os
import re

import numpy as np

from gissl.data.datasets import ClassificationDataset, _check_all, _checked, _list_images, _require_two_classes
from gissl.data.images import report_bad
from gissl.data.splits import split_indices
from gissl.errors import DataError, UserError

LABEL_KINDS = ("binary", "multiclass", "ordinal")
CHEXPERT_UNCERTAIN = ("ones", "zeros", "ignore")
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
# the 14 findings and "No Finding" of Data_Entry_2017.csv; the study keeps single-finding rows of CHESTX_CLASSES
CHESTX_FINDINGS = CHESTX_CLASSES + ("Pneumonia", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                                    "Pleural_Thickening", "Hernia", "No Finding")
EYEPACS_CLASSES = ("0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative DR")
BACH_CLASSES = ("Normal", "Benign", "InSitu", "Invasive")  # the study's ordinal ids 0..3


# --------------------------------------------------------------------------- shared steps

def _read_rows(path):
    """``(header, [(line number, row dict)])`` of a CSV file (UTF-8, optional BOM)."""
    if not os.path.isfile(path):
        raise DataError(f"label file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, row) for row in reader]
        return list(reader.fieldnames or []), rows


def _need_columns(path, header, columns, flags=None):
    missing = [c for c in columns if c not in header]
    if missing:
        hint = f" (set it with {flags[missing[0]]})" if flags and missing[0] in flags else ""
        raise DataError(f"{path} has no column '{missing[0]}'{hint}; its columns are: {', '.join(header)}")


def _finish(listed, bad, skip_bad, what, classes):
    """Check every listed ``(path, label, group, split, where)`` image and build the samples."""
    present = []
    for item in listed:
        if os.path.isfile(item[0]):
            present.append(item)
        else:
            bad.append(f"{item[4]}: no image {item[0]}")
    checked = _check_all(item[0] for item in present)
    samples = [{"image": p, "label": label, "size": size, "group": group, "split": split}
               for p, label, group, split, where in present if (size := _checked(p, bad, checked)) is not None]
    report_bad(bad, skip_bad, what)
    if not samples:
        raise DataError(f"no usable labelled images in {what}")
    _require_two_classes(samples, list(classes), what)
    return samples, list(classes)


def _find(root, candidates, what):
    for c in candidates:
        if os.path.exists(os.path.join(root, c)):
            return os.path.join(root, c)
    raise DataError(f"{what} not found under {root}: expected {' or '.join(os.path.join(root, c) for c in candidates)}")


# --------------------------------------------------------------------------- generic CSV

def _csv_classes(values, kind, classes):
    """Class names and a ``value -> id`` function for the label ``kind``."""
    if classes:
        ids = {c: i for i, c in enumerate(classes)}
        if kind == "binary" and len(classes) != 2:
            raise UserError(f"--label-kind binary needs two --classes (negative,positive); got {len(classes)}")
        return list(classes), ids.get
    if kind == "binary":
        return ["0", "1"], lambda v: {"0": 0, "1": 1, "0.0": 0, "1.0": 1}.get(v)
    if kind == "ordinal":
        ints = [int(v) for v in values if re.fullmatch(r"\d+", v)]
        top = max(ints, default=-1)
        return [str(i) for i in range(top + 1)], lambda v: int(v) if re.fullmatch(r"\d+", v) else None
    distinct = sorted(set(v for v in values if v))
    if distinct and all(re.fullmatch(r"-?\d+", v) for v in distinct):
        distinct = sorted(distinct, key=int)  # 2 before 10
    ids = {c: i for i, c in enumerate(distinct)}
    return distinct, ids.get


def csv_labels(labels, root=None, *, path_column="path", label_column="label", kind="multiclass", classes=None,
               group_column=None, skip_bad=False):
    """Images listed in the CSV file ``labels`` (``--dataset csv --labels FILE.csv``).

    Paths are relative to ``root`` (default: the CSV's folder) unless absolute. ``kind``:
    ``binary`` (labels 0/1, or the two ``classes`` negative first), ``multiclass`` (class ids in
    the order of ``classes``, default the sorted distinct labels, numerically when all are
    integers) or ``ordinal`` (integers 0..K-1, or the order of ``classes``). ``group_column``:
    a patient id, so that no patient spans two splits. A label outside these rules, an empty
    cell or a missing image is a bad row."""
    if kind not in LABEL_KINDS:
        raise UserError(f"unknown --label-kind '{kind}'; choose from {', '.join(LABEL_KINDS)}")
    root = root or os.path.dirname(os.path.abspath(labels))
    header, rows = _read_rows(labels)
    flags = {path_column: "--path-column", label_column: "--label-column", group_column: "--group-column"}
    _need_columns(labels, header, [c for c in (path_column, label_column, group_column) if c], flags)
    values = [(row.get(label_column) or "").strip() for _, row in rows]
    names, to_id = _csv_classes(values, kind, classes)
    bad, listed = [], []
    for (line, row), value in zip(rows, values):
        where, rel = f"{labels} line {line}", (row.get(path_column) or "").strip()
        label = to_id(value) if value else None
        if not rel or label is None:
            bad.append(f"{where}: " + (f"empty {path_column}" if not rel else f"unknown label '{value}' ({kind}"
                                       + (f"; --classes {','.join(names)})" if classes else ")")))
            continue
        group = ((row.get(group_column) or "").strip() or None) if group_column else None
        listed.append((os.path.join(root, rel), label, group, None, where))
    return _finish(listed, bad, skip_bad, f"{labels}", names)


# --------------------------------------------------------------------------- chest X-ray

def _chexpert_csvs(root):
    for base in (root, os.path.join(root, "CheXpert-v1.0"), os.path.join(root, "CheXpert-v1.0-small")):
        if os.path.isfile(os.path.join(base, "train.csv")):
            return base
    raise DataError(f"CheXpert not found under {root}: expected {root}/CheXpert-v1.0/train.csv (and valid.csv)")


def chexpert(root, *, uncertain="ones", skip_bad=False):
    """CheXpert as downloaded: ``CheXpert-v1.0/train.csv`` and ``valid.csv`` (the ``-small`` copy too),
    ``Path`` entries relative to the folder that holds ``CheXpert-v1.0/``.

    The study's many-to-one label: Pleural Effusion positive (1.0), everything else negative,
    a blank cell negative (its ``fillna(0)``). Uncertain (-1.0): ``uncertain="ones"`` maps it to
    positive, the study's few-shot rule (U-Ones; its soft labels U(0.55, 0.85) elsewhere were
    truncated to 0 by an integer cast, docs/transfer-study.md §b.4 item 4), ``zeros`` to
    negative, ``ignore`` leaves the row out. ``valid.csv`` is the test split (the study's row
    shuffle of train.csv leaked patients); train.csv is split by patient into train and val.
    """
    if uncertain not in CHEXPERT_UNCERTAIN:
        raise UserError(f"unknown --chexpert-uncertain '{uncertain}'; choose from {', '.join(CHEXPERT_UNCERTAIN)}")
    base = _chexpert_csvs(root)
    parent = os.path.dirname(base)
    mapping = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "": 0, "-1.0": {"ones": 1, "zeros": 0}.get(uncertain),
               "-1": {"ones": 1, "zeros": 0}.get(uncertain)}
    bad, listed = [], []
    for name, split in (("train.csv", None), ("valid.csv", "test")):
        path = os.path.join(base, name)
        if split == "test" and not os.path.isfile(path):
            raise DataError(f"CheXpert at {base} has train.csv but no valid.csv (the test split)")
        header, rows = _read_rows(path)
        _need_columns(path, header, ["Path", "Pleural Effusion"])
        for line, row in rows:
            value, rel = (row["Pleural Effusion"] or "").strip(), (row["Path"] or "").strip()
            if value not in mapping or not rel:
                bad.append(f"{path} line {line}: " + ("empty Path" if not rel else f"unknown Pleural Effusion "
                                                     f"label '{value}' (expected 1.0, 0.0, -1.0 or blank)"))
                continue
            if mapping[value] is None:
                continue  # uncertain, --chexpert-uncertain ignore
            patient = re.search(r"patient\d+", rel)
            image = os.path.join(parent, rel)
            if not os.path.exists(image) and "/" in rel:  # the release folder renamed: relative to the CSVs
                image = os.path.join(base, rel.split("/", 1)[1])
            listed.append((image, mapping[value], patient.group(0) if patient else None, split, f"{path} line {line}"))
    return _finish(listed, bad, skip_bad, f"CheXpert at {base}", ("no pleural effusion", "pleural effusion"))


def _chestx_images(folder):
    """``{file name: path}`` of the images in ``folder/images/`` (the study's merged folder) or,
    when that is absent, in the release's ``images_001/images/`` .. ``images_012/images/``."""
    subs = ["images"] if os.path.isdir(os.path.join(folder, "images")) else sorted(
        os.path.join(d, "images") for d in os.listdir(folder) if re.fullmatch(r"images_\d+", d))
    return {os.path.basename(p): p for sub in subs for p in _list_images(os.path.join(folder, sub))}


def chestxray14(root, skip_bad=False):
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` + every image in ``images/`` (the study merges the
    ``images_0XX`` folders; unmerged ``images_0XX/images/`` are read too). The study's rule:
    single-finding rows of Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, Nodule or
    Pneumothorax, ids 0..6; "No Finding", Pneumonia, the other findings and rows with several
    findings are left out (not bad rows). Split by ``Patient ID``."""
    path = _find(root, ["Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"], "ChestX-ray14 Data_Entry_2017.csv")
    folder = os.path.dirname(path)
    header, rows = _read_rows(path)
    _need_columns(path, header, ["Image Index", "Finding Labels"])
    images = _chestx_images(folder)
    bad, listed = [], []
    for line, row in rows:
        findings = [f.strip() for f in (row["Finding Labels"] or "").split("|") if f.strip()]
        unknown = [f for f in findings if f not in CHESTX_FINDINGS]
        name = (row["Image Index"] or "").strip()
        if unknown or not findings or not name:
            bad.append(f"{path} line {line}: " + (f"unknown finding '{unknown[0]}'" if unknown else
                                                 "empty Finding Labels" if not findings else "empty Image Index"))
            continue
        if len(findings) == 1 and findings[0] in CHESTX_CLASSES:
            listed.append((images.get(name, os.path.join(folder, "images", name)),
                           CHESTX_CLASSES.index(findings[0]), (row.get("Patient ID") or "").strip() or None, None,
                           f"{path} line {line}"))
    return _finish(listed, bad, skip_bad, f"ChestX-ray14 at {root}", CHESTX_CLASSES)


def _tb_set(root, csv_names, image_dir, what, skip_bad):
    """Montgomery / Shenzhen: the study reads column 0 (file name, ``study_id``) and column 3
    (``findings``) of the metadata CSV (Kaggle's ``study_id,sex,age,findings``); "normal" is
    negative, any other finding (TB) positive; an empty finding is bad. Images in the NLM
    release's folder, which the study reads, or Kaggle's ``images/images/``."""
    path = _find(root, csv_names, f"{what} metadata")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    folder = _find(os.path.dirname(path), [os.path.join(*image_dir), os.path.join("images", "images"), "images"],
                   f"{what} images")
    bad, listed = [], []
    for line, row in enumerate(rows[1:], start=2):  # row 1 is the header (pandas' header=0)
        name, finding = (row[0].strip() if row else ""), (row[3].strip() if len(row) > 3 else "")
        if not name or not finding:
            bad.append(f"{path} line {line}: " + ("empty file name" if not name else "no findings (column 4)"))
            continue
        listed.append((os.path.join(folder, name), int(finding.lower() != "normal"), None, None, f"{path} line {line}"))
    return _finish(listed, bad, skip_bad, f"{what} at {root}", ("normal", "abnormal"))


def montgomery(root, skip_bad=False):
    """Montgomery County CXR: ``montgomery_metadata.csv`` + ``MontgomerySet/CXR_png/``."""
    return _tb_set(root, ["montgomery_metadata.csv"], ("MontgomerySet", "CXR_png"), "Montgomery CXR", skip_bad)


def shenzhen(root, skip_bad=False):
    """Shenzhen CXR: ``shenzhen_metadata.csv`` (the study's code; its README says
    ``shenzhencxr_metadata.csv``, also accepted) + ``ChinaSet_AllFiles/CXR_png/``."""
    return _tb_set(root, ["shenzhen_metadata.csv", "shenzhencxr_metadata.csv"], ("ChinaSet_AllFiles", "CXR_png"),
                   "Shenzhen CXR", skip_bad)


# --------------------------------------------------------------------------- fundus and histology

def eyepacs(root, skip_bad=False):
    """EyePACS (Kaggle diabetic retinopathy): ``trainLabels.csv`` (``image,level``) with
    ``train/<image>.jpeg``, and when present ``testLabels.csv`` with ``test/`` as the test split
    (as the study). Grades 0..4 are the ordinal classes; the patient is the image name without
    ``_left`` / ``_right``, so both eyes stay in one split."""
    bad, listed = [], []
    for name, folder, split in (("trainLabels.csv", "train", None), ("testLabels.csv", "test", "test")):
        path = os.path.join(root, name)
        if split == "test" and not os.path.isfile(path):
            continue
        header, rows = _read_rows(path)
        _need_columns(path, header, ["image", "level"])
        for line, row in rows:
            image, level = (row["image"] or "").strip(), (row["level"] or "").strip()
            if not image or level not in ("0", "1", "2", "3", "4"):
                bad.append(f"{path} line {line}: " + ("empty image" if not image else f"unknown level '{level}' "
                                                      "(expected 0-4)"))
                continue
            listed.append((os.path.join(root, folder, image + ".jpeg"), int(level),
                           re.sub(r"_(left|right)$", "", image), split, f"{path} line {line}"))
    return _finish(listed, bad, skip_bad, f"EyePACS at {root}", EYEPACS_CLASSES)


def _letter_labelled(files, letters, bad, what_folder=None):
    """``[(path, label)]`` from the first letter of each file name (``letters``: letter -> label)."""
    out = []
    for f in files:
        letter = os.path.basename(f)[:1].upper()
        if letter not in letters or (what_folder is not None and letters[letter] != what_folder):
            bad.append(f"{f}: file name starts with '{letter}', which is not " +
                       ("a label letter (" + ", ".join(letters) + ")" if letter not in letters else
                        "this folder's label"))
            continue
        out.append((f, letters[letter]))
    return out


def ichallenge_amd(root, skip_bad=False):
    """iChallenge-AMD ``Training400/AMD/A*.jpg`` (positive) and ``Training400/Non-AMD/N*.jpg``: the
    label is the file name's letter, and must agree with the folder."""
    base = _find(root, ["Training400", "."], "iChallenge-AMD Training400")
    bad, listed = [], []
    for folder, label in (("AMD", 1), ("Non-AMD", 0)):
        path = os.path.join(base, folder)
        if not os.path.isdir(path):
            raise DataError(f"iChallenge-AMD folder not found: {path}")
        listed += _letter_labelled(_list_images(path), {"A": 1, "N": 0}, bad, what_folder=label)
    items = [(p, label, None, None, p) for p, label in listed]
    return _finish(items, bad, skip_bad, f"iChallenge-AMD at {base}", ("non-AMD", "AMD"))


def ichallenge_pm(root, skip_bad=False):
    """iChallenge-PM (PALM) ``PALM-Training400/PALM-Training400/*.jpg``: H = high myopia,
    P = pathological myopia, N = normal; as the study's README, high and pathological myopia
    together are positive."""
    base = _find(root, [os.path.join("PALM-Training400", "PALM-Training400"), "PALM-Training400", "."],
                 "iChallenge-PM PALM-Training400")
    bad = []
    listed = _letter_labelled(_list_images(base), {"H": 1, "P": 1, "N": 0}, bad)
    items = [(p, label, None, None, p) for p, label in listed]
    return _finish(items, bad, skip_bad, f"iChallenge-PM at {base}", ("normal", "myopia (high or pathological)"))


def bach(root, skip_bad=False):
    """BACH (ICIAR 2018) microscopy ``ICIAR2018_BACH_Challenge/Photos/<class>/*.tif``; classes in
    the study's ordinal order Normal, Benign, InSitu, Invasive (ids 0..3)."""
    base = _find(root, [os.path.join("ICIAR2018_BACH_Challenge", "Photos"), "Photos", "."], "BACH Photos")
    bad, items = [], []
    for label, name in enumerate(BACH_CLASSES):
        folder = os.path.join(base, name)
        if not os.path.isdir(folder):
            bad.append(f"{folder}: class folder missing (class {label} '{name}')")
            continue
        items += [(p, label, None, None, p) for p in _list_images(folder)]
    return _finish(items, bad, skip_bad, f"BACH at {base}", BACH_CLASSES)


# --------------------------------------------------------------------------- registry and splits

READERS = {"CheXpert": chexpert, "ChestX-ray14": chestxray14, "MontgomeryCXR": montgomery,
           "ShenzhenCXR": shenzhen, "EyePACS": eyepacs, "iChallenge_AMD": ichallenge_amd,
           "iChallenge_PM": ichallenge_pm, "BACH": bach}
MEDICAL_DATASETS = ("csv",) + tuple(READERS)


def read_medical(dataset, root, *, labels=None, path_column="path", label_column="label", label_kind="multiclass",
                 classes=None, group_column=None, chexpert_uncertain="ones", skip_bad=False):
    """``(samples, classes)`` of a medical ``dataset`` (one of ``MEDICAL_DATASETS``) at ``root``."""
    if dataset == "csv":
        if not labels:
            raise UserError("--dataset csv needs --labels FILE.csv (one row per image: a path and a label column)")
        return csv_labels(labels, root, path_column=path_column, label_column=label_column, kind=label_kind,
                          classes=classes, group_column=group_column, skip_bad=skip_bad)
    if dataset not in READERS:
        raise UserError(f"unknown medical dataset '{dataset}'; choose from {', '.join(MEDICAL_DATASETS)}")
    if dataset == "CheXpert":
        return chexpert(root, uncertain=chexpert_uncertain, skip_bad=skip_bad)
    return READERS[dataset](root, skip_bad=skip_bad)


def medical_split(samples, seed=42):
    """``(train, val, test)`` index arrays, whole patients (``group``) at a time.

    Samples marked ``split="test"`` (a dataset's own test CSV) form the test split and the rest
    is divided 8:1 into train and val; otherwise the patients get SSL4GIE's 80/10/10
    :func:`~gissl.data.split_indices`. A sample without a group is its own patient."""
    keys = [s.get("group") or f"#{i}" for i, s in enumerate(samples)]
    fixed = [i for i, s in enumerate(samples) if s.get("split") == "test"]
    rest = [i for i, s in enumerate(samples) if s.get("split") != "test"]
    groups = list(dict.fromkeys(keys[i] for i in rest))
    if fixed:
        order = np.random.RandomState(seed).permutation(len(groups))
        n_val = max(1, round(len(groups) / 9))
        parts = [order[n_val:], order[:n_val]]
    else:
        parts = list(split_indices(len(groups), seed))
    where = {}
    for part, idx in enumerate(parts):
        where.update({groups[j]: part for j in idx})
    out = [[i for i in rest if where[keys[i]] == part] for part in range(len(parts))]
    if fixed:
        out.append(fixed)
    return tuple(np.array(ix, dtype=np.int64) for ix in out)


def add_dataset_arguments(parser):
    """The flags of the medical datasets (``--labels`` and its columns, ``--chexpert-uncertain``)."""
    g = parser.add_argument_group("medical datasets (--dataset csv and the transfer study's presets)")
    g.add_argument("--labels", default=None, metavar="FILE.csv",
                   help="--dataset csv: the label file, one row per image; paths relative to --data-root "
                        "(default: the CSV's folder)")
    g.add_argument("--path-column", dest="path_column", default="path", help="--labels column with the image path")
    g.add_argument("--label-column", dest="label_column", default="label", help="--labels column with the label")
    g.add_argument("--label-kind", dest="label_kind", default="multiclass", choices=LABEL_KINDS,
                   help="binary = labels 0/1; multiclass = any values (ids in sorted order); ordinal = "
                        "integers 0..K-1 (or the order of --classes)")
    g.add_argument("--classes", default=None,
                   help="comma-separated class names in id order (default: from the labels); other labels are bad rows")
    g.add_argument("--group-column", dest="group_column", default=None,
                   help="--labels column with a patient id: a patient's images stay in one split")
    g.add_argument("--chexpert-uncertain", dest="chexpert_uncertain", default="ones", choices=CHEXPERT_UNCERTAIN,
                   help="CheXpert's uncertain (-1) Pleural Effusion labels: ones = positive (the study's few-shot "
                        "rule), zeros = negative, ignore = leave the image out")
    return parser


def build_medical_datasets(dataset, root, *, image_size=224, seed=42, skip_bad=False, augment_train=True, **options):
    """``(dict(train=, val=, test=) of ClassificationDataset, class names)`` for a medical dataset;
    ``options`` go to :func:`read_medical`. Images are resized to a square (grey X-rays become
    3 identical channels) and normalised with the ImageNet statistics, like every gissl input."""
    samples, classes = read_medical(dataset, root, skip_bad=skip_bad, **options)
    parts = medical_split(samples, seed)
    out = {}
    for name, idx in zip(("train", "val", "test"), parts):
        if len(idx) == 0:
            raise DataError(f"{dataset} at {root}: the {name} split is empty ({len(samples)} usable images); "
                            "the dataset is too small to split")
        out[name] = ClassificationDataset([samples[i] for i in idx], image_size,
                                          train=name == "train" and augment_train, classes=classes)
    return out, classes
