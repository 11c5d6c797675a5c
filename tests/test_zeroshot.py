"""eval_transfer.py --protocol zeroshot / image-text-retrieval on a hand-made image–text model:
the zero-shot probabilities equal a direct computation of CLIP's prompt-ensembled classifier
(Radford et al. 2021 §3.1.4), the scores equal scikit-learn's; Recall@K equals a loop over the
ranking; bad templates and class-name lists stop with a message naming the flag."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

import eval_transfer
from gissl import probes
from gissl.classification import build_datasets
from gissl.data import build_caption_datasets
from gissl.errors import UserError
from gissl.tokenizer import ClipTokenizer

CLASSES = ("cecum", "pylorus", "z-line")


class HandMade(torch.nn.Module):
    """Image: mean colour -> fixed 3x4 matrix; text: sum of fixed token vectors (0 = padding)."""

    def __init__(self, vocab_size):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3, 4, generator=g))
        self.emb = torch.nn.Parameter(torch.randn(vocab_size, 4, generator=g))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.text = torch.nn.Module()
        self.text.context_length = 12

    def encode_image(self, images):
        return images.mean((2, 3)) @ self.proj

    def encode_text(self, tokens):
        return (self.emb[tokens] * (tokens > 0)[..., None]).sum(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(10):
            a = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
            a[..., c] += 150
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def _args(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["eval_transfer.py", "--architecture", "resnet18", "--pretraining",
                                      "Hyperkvasir", "--ss-framework", "clip", "--image-size", "32",
                                      "--workers", "0", "--no-cache", *argv])
    return eval_transfer.get_args()


def test_zeroshot_equals_direct_computation(folder, tmp_path, monkeypatch):
    tokenizer = ClipTokenizer.learn([f"endoscopy image of the {c}" for c in CLASSES], vocab_size=600)
    model = HandMade(tokenizer.vocab_size)
    ckpt = tmp_path / "unused.pth"
    ckpt.write_bytes(b"")  # --checkpoint must exist; the model is handed over directly
    templates = tmp_path / "templates.txt"
    templates.write_text("endoscopy image of the {}\na photo of {}\n")
    monkeypatch.chdir(tmp_path)
    args = _args(monkeypatch, ["--protocol", "zeroshot", "--dataset", "folder", "--data-root", str(folder),
                               "--split", "stratified", "--checkpoint", str(ckpt), "--templates", str(templates),
                               "--output-dir", str(tmp_path / "out")])
    res = eval_transfer.main(args, encoder=(model, tokenizer))
    # direct: W_c = norm(mean_t norm(text(t(c)))), p = softmax(s * norm(image) W^T)
    ds, _ = build_datasets("folder", str(folder), image_size=32, split="stratified", augment_train=False)
    images = torch.stack([ds["test"][i]["image"] for i in range(len(ds["test"]))])
    labels = np.array([int(ds["test"][i]["label"]) for i in range(len(ds["test"]))])
    with torch.no_grad():
        rows = []
        for name in ("cecum", "pylorus", "z line"):
            t = tokenizer([f"endoscopy image of the {name}", f"a photo of {name}"], context_length=12)
            e = model.encode_text(t)
            e = e / e.norm(dim=1, keepdim=True)
            rows.append(e.mean(0) / e.mean(0).norm())
        u = model.encode_image(images)
        probs = torch.softmax(10.0 * (u / u.norm(dim=1, keepdim=True)) @ torch.stack(rows).T, 1).numpy()
    assert res["Top-1 accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert res["mF1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro", labels=sorted(set(labels))))
    assert res["mAUROC"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert res["Top-5 accuracy"] == 1.0 and res["Templates"] == 2
    with pytest.raises(UserError, match="--classnames"):
        eval_transfer.main(_args(monkeypatch, ["--protocol", "zeroshot", "--dataset", "folder", "--data-root",
                                               str(folder), "--checkpoint", str(ckpt), "--classnames", "a,b"]),
                           encoder=(model, tokenizer))
    templates.write_text("no placeholder here\n")
    with pytest.raises(UserError, match="--templates"):
        probes.read_templates(str(templates))
    with pytest.raises(UserError, match="--checkpoint"):
        _args(monkeypatch, ["--protocol", "zeroshot"])


def test_image_text_recall_equals_ranking_loop(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(3)
    images, texts = torch.randn(6, 5, generator=g), torch.randn(13, 5, generator=g)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 1, 3])
    got = probes.image_text_recall(images, texts, owner, ks=(1, 5, 10))
    sim = F.normalize(images, dim=1) @ F.normalize(texts, dim=1).T
    for k in (1, 5, 10):
        i2t = np.mean([any(owner[j] == i for j in sim[i].argsort(descending=True)[:k]) for i in range(6)])
        t2i = np.mean([owner[j] in sim[:, j].argsort(descending=True)[:k] for j in range(13)])
        assert got[f"image-to-text R@{k}"] == pytest.approx(100 * i2t)
        assert got[f"text-to-image R@{k}"] == pytest.approx(100 * t2i)
    # through the script, on a caption folder's held-out test split
    root = tmp_path / "caps"
    root.mkdir()
    rows = ["image,caption"]
    for i in range(20):
        Image.fromarray(np.full((24, 24, 3), i * 12, np.uint8)).save(root / f"{i}.png")
        rows += [f"{i}.png,frame number {i}", f"{i}.png,another caption {i}"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    tokenizer = ClipTokenizer.learn([r.split(",")[1] for r in rows[1:]], vocab_size=600)
    ckpt = tmp_path / "unused.pth"
    ckpt.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    res = eval_transfer.main(_args(monkeypatch, ["--protocol", "image-text-retrieval", "--data-root", str(root),
                                                 "--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "o")]),
                             encoder=(HandMade(tokenizer.vocab_size), tokenizer))
    test = build_caption_datasets(str(root))["test"]
    assert res["Images"] == len(test) == 2 and res["Captions"] == 4
    assert res["image-to-text R@10"] == res["text-to-image R@10"] == 100.0
