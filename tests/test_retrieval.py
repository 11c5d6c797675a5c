"""Retrieval library: polyp-aware masking, descriptor transforms, faiss index, neighbour vote."""
import time

import numpy as np
import pytest
import torch

from gissl.errors import UserError
from gissl.retrieval import neighbour_vote, patch_coverage, polyp_aware_masking, vote_sentence
from gissl.search import DescriptorIndex, DescriptorTransform, exact_topk, recall_at_k


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---- polyp-aware masking ----------------------------------------------------------------------

def test_polyp_aware_masking_never_masks_a_patch_touching_the_polyp():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(16, 1, 64, 64)
    for i in range(16):  # random boxes of polyp, some only one pixel into a patch
        y, x = torch.randint(0, 50, (2,), generator=g).tolist()
        h, w = torch.randint(1, 30, (2,), generator=g).tolist()
        masks[i, 0, y:y + h, x:x + w] = 1.0
    masks[0, 0, 17, 17] = 1.0  # a single pixel touching a patch is still "touching"
    masks[1].zero_()           # no polyp: plain random masking
    cov = patch_coverage(masks, 16)  # (16, 16 patches)
    ids_keep, masked = polyp_aware_masking(cov, num_keep=8, generator=g)
    assert ids_keep.shape == (16, 8) and masked.shape == (16, 16)
    assert (masked.sum(1) == 8).all()
    touching = cov > 0
    for i in range(16):
        if touching[i].sum() <= 8:
            assert not (masked[i] & touching[i]).any()
        else:  # the polyp is larger than the visible budget: only polyp patches are visible
            assert touching[i][~masked[i]].all()
    assert not masked[0].view(4, 4)[1, 1]


def test_masks_binarised_before_scoring():
    masks = torch.full((1, 1, 32, 32), 0.2)  # JPEG-like noise below 0.5 is background
    assert patch_coverage(masks, 16).sum() == 0


# ---- descriptor transform --------------------------------------------------------------------

def test_pca_whitening_and_hash():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) + 3.0
    t = DescriptorTransform("pcaw", dim=8).fit(x)
    raw = (x - t.mean) @ t.projection
    assert np.allclose(np.cov(raw, rowvar=False), np.eye(8), atol=1e-6)
    y = t(x)
    assert y.shape == (500, 8) and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    h = DescriptorTransform("center", hash=True).fit(x)
    codes = h(x[:5])
    assert set(np.unique(codes)) <= {-1.0, 1.0}
    hamming = (codes[0] != codes[1]).sum()
    assert codes[0] @ codes[1] == 16 - 2 * hamming
    with pytest.raises(UserError):
        DescriptorTransform("pcaw")(x)


# ---- faiss index ------------------------------------------------------------------------------

def test_exact_search_equals_numpy_bruteforce():
    rng = np.random.default_rng(1)
    gallery, queries = _unit(rng.standard_normal((3000, 64))), _unit(rng.standard_normal((40, 64)))
    index = DescriptorIndex(64, "flat", device="cpu").add(gallery[:1000]).add(gallery[1000:])
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = exact_topk(gallery, queries, 10)
    assert (ids == ref_ids).all()
    assert np.allclose(scores, ref_scores, atol=1e-5)


def test_save_load_incremental_metadata(tmp_path):
    rng = np.random.default_rng(2)
    gallery = _unit(rng.standard_normal((2000, 32)))
    index = DescriptorIndex(32, "ivfflat", nprobe=4, device="cpu")
    index.transform = DescriptorTransform("center").fit(gallery)
    index.label_names = ["a", "b"]
    index.add(gallery[:1500], names=[f"g{i}" for i in range(1500)], labels=[i % 2 for i in range(1500)])
    path = tmp_path / "gallery.npz"
    index.save(path)
    loaded = DescriptorIndex.load(path, device="cpu")
    loaded.add(gallery[1500:], names=[f"g{i}" for i in range(1500, 2000)], labels=[0] * 500)
    assert loaded.ntotal == 2000 and loaded.names[1700] == "g1700" and loaded.labels[3] == 1
    assert loaded.label_names == ["a", "b"] and loaded.params["nprobe"] == 4
    assert np.allclose(loaded.transform.mean, index.transform.mean)
    # visiting every cell makes IVF-Flat exact
    loaded.set_nprobe(loaded.params["nlist"])
    _, ids = loaded.search(gallery[:20], 5)
    _, ref = exact_topk(gallery, gallery[:20], 5)
    assert (ids == ref).all()


def test_ivfpq_with_refinement_and_small_gallery():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((50, 64))
    gallery = _unit(centres[rng.integers(0, 50, 4000)] + 0.3 * rng.standard_normal((4000, 64)))
    queries = _unit(gallery[:50] + 0.05 * rng.standard_normal((50, 64)))
    index = DescriptorIndex(64, "ivfpq", nprobe=8, pq_m=8, pq_bits=6, refine=10, device="cpu")
    index.add(gallery)
    _, ids = index.search(queries, 10)
    _, ref = exact_topk(gallery, queries, 10)
    assert recall_at_k(ids, ref) >= 0.9
    scores, ids = DescriptorIndex(64, device="cpu").add(gallery[:3]).search(queries[:1], 5)
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    with pytest.raises(UserError):
        DescriptorIndex(64, "ivfflat", device="cpu").add(gallery[:10])


@pytest.mark.slow
def test_approximate_recall_at_10_on_100k():
    """IVF-Flat and HNSW reach recall@10 >= 0.95 of exact search on 100k 512-d vectors."""
    rng = np.random.default_rng(0)
    n, d = 100_000, 512
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    x = centres[rng.integers(0, 1000, n + 200)] + 0.6 * rng.standard_normal((n + 200, d), dtype=np.float32)
    x = _unit(x)
    gallery, queries = x[:n], x[n:]
    t = time.perf_counter()
    _, exact = DescriptorIndex(d, "flat", device="cpu").add(gallery).search(queries, 10)
    t_exact = time.perf_counter() - t
    for kind, kw in [("ivfflat", dict(nprobe=16)), ("hnsw", dict(hnsw_m=16, ef_construction=40, ef_search=128))]:
        index = DescriptorIndex(d, kind, device="cpu", **kw)
        index.train(gallery[:20000]).add(gallery)
        t = time.perf_counter()
        _, ids = index.search(queries, 10)
        t_approx = time.perf_counter() - t
        recall = recall_at_k(ids, exact)
        print(f"{kind}: recall@10 {recall:.4f}, search speed-up x{t_exact / t_approx:.1f} vs exact")
        assert recall >= 0.95, kind


# ---- neighbour vote ----------------------------------------------------------------------------

def test_neighbour_vote_majority_ties_and_weights():
    labels = np.array([[2, 1, 1, 2, 0], [0, 0, 1, -1, -1], [-1, -1, -1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.5], [0.2, 0.2, 0.9, 0.5, 0.5], [0.1] * 5])
    pred, shares = neighbour_vote(labels, num_classes=3)
    assert pred.tolist() == [2, 0, -1]  # row 0: 2 and 1 tie, the nearest (2) decides
    assert np.allclose(shares[0], [0.2, 0.4, 0.4]) and np.allclose(shares[1], [2 / 3, 1 / 3, 0])
    wpred, _ = neighbour_vote(labels, scores, num_classes=3, weighted=True)
    assert wpred[:2].tolist() == [1, 1]  # 1.5 > 1.0 and 0.9 > 0.4
    assert vote_sentence(labels[0], 2, ["a", "b", "adenoma"]) == "2 of 5 nearest cases were adenoma"


# ---- model -------------------------------------------------------------------------------------

def _vit(size=64):
    from gissl.models import build_encoder
    return build_encoder("vit_t", img_size=size)


def test_vit_model_masked_pass_reconstruction_and_descriptor():
    from gissl.retrieval import RetrievalModel
    torch.manual_seed(0)
    model = RetrievalModel(_vit(), dim=32, decoder_dim=32, decoder_depth=1)
    x = torch.randn(4, 3, 64, 64)
    masks = torch.zeros(4, 1, 64, 64)
    masks[:, :, 0:20, 0:20] = 1
    out = model(x, masks)
    assert out["z"].shape == (4, 32) and torch.allclose(out["z"].norm(dim=1), torch.ones(4))
    assert torch.isfinite(out["mse"]) and out["mse"] > 0
    (out["z"].sum() + out["mse"]).backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.decoder_pred.weight.grad is not None
    assert model(x, None)["z"].shape == (4, 32)  # masks are optional: random masking
    model.eval()
    d = model.descriptor(x)  # backbone CLS, projection dropped (EndoFinder)
    assert d.shape == (4, 192)
    assert torch.allclose(d, torch.nn.functional.normalize(model.encoder(x), dim=1), atol=1e-5)
    assert model.descriptor(x, use_head=True).shape == (4, 32)


def test_resnet_gem_descriptor():
    from gissl.models import build_encoder
    from gissl.retrieval import DescriptorModel, RetrievalModel, gem
    model = RetrievalModel(build_encoder("resnet18"), dim=16).eval()
    x = torch.rand(2, 3, 64, 64)
    fmap = model.encoder.forward_features(x)[-1]
    expected = fmap.clamp(min=1e-6).pow(3).mean(dim=(-2, -1)).pow(1 / 3)
    assert torch.allclose(gem(fmap), expected, atol=1e-6)
    assert torch.allclose(model.descriptor(x), torch.nn.functional.normalize(expected, dim=1), atol=1e-5)
    assert "mse" not in model.train()(x)  # no reconstruction for CNNs
    model.eval()
    traced = torch.jit.trace(DescriptorModel(model), x)  # the --export-torchscript module
    assert torch.allclose(traced(x), model.descriptor(x), atol=1e-5)


def test_mixup_cutmix_soft_labels():
    from gissl.retrieval import mixup_cutmix
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    ids = torch.arange(4).repeat(2)
    mixed, soft = mixup_cutmix(x, ids, 4, prob=1.0, generator=g)
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft[torch.arange(8), ids] > 0).all()  # still matches its own instance
    same, hard = mixup_cutmix(x, ids, 4, prob=0.0)
    assert same is x and torch.equal(hard.argmax(1), ids)


def test_two_views_move_image_and_mask_together(tmp_path):
    """A white square on black with the same square as mask: after every view's flips,
    rotations and crops the mask still covers the bright pixels."""
    from PIL import Image
    from gissl.retrieval_data import TwoViewDataset
    img = np.zeros((96, 96, 3), np.uint8)
    img[10:50, 30:70] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img[..., 0]).save(tmp_path / "a_mask.png")
    ds = TwoViewDataset([{"image": str(tmp_path / "a.png"), "mask": str(tmp_path / "a_mask.png")}] * 12,
                        image_size=32, min_scale=0.3)
    torch.manual_seed(0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    checked = 0
    for i in range(12):
        s = ds[i]
        assert s["image"].shape == (2, 3, 32, 32) and s["mask"].shape == (2, 1, 32, 32)
        for v in range(2):
            m = s["mask"][v, 0] > 0.5
            grey = (s["image"][v] * std[:, None, None] + mean[:, None, None]).mean(0)
            if m.sum() < 10 or (~m).sum() < 10:
                continue
            # ColorJitter (brightness and contrast down to 0.2) can shrink the contrast to ~0.04;
            # a mask moved differently from the image would put dark pixels inside it
            assert grey[m].mean() > grey[~m].mean() + 0.02
            checked += 1
    assert checked >= 6


# ---- scripts end to end (tiny) -----------------------------------------------------------------

@pytest.mark.slow
def test_train_eval_predict_scripts(tmp_path, monkeypatch):
    import sys
    import eval_retrieval
    import predict_retrieval
    import train_retrieval
    from gissl.data.synthetic import generate
    from gissl.retrieval_data import write_synthetic_twins
    kvasir = generate("Kvasir", str(tmp_path / "kvasir"), num=10, seed=3)
    twins = write_synthetic_twins(str(tmp_path / "twins"), kvasir, num_refs=6, num_queries=4,
                                  num_distractors=2, seed=0)
    out = str(tmp_path / "models")
    common = ["--architecture", "vit_t", "--image-size", "32", "--workers", "0", "--output-dir", out,
              "--decoder-dim", "32", "--decoder-depth", "1", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_retrieval.py", *common, "--data-root", kvasir, "--val-root", twins,
                                      "--epochs", "1", "--batch-size", "4"])
    train_retrieval.main(train_retrieval.get_args())
    pred_csv = tmp_path / "pred.csv"
    monkeypatch.setattr(sys, "argv", ["eval_retrieval.py", *common, "--data-root", twins, "--k", "3",
                                      "--save-predictions", str(pred_csv)])
    eval_retrieval.main(eval_retrieval.get_args())
    rows = pred_csv.read_text().splitlines()
    assert rows[0] == "query,rank,reference,score" and len(rows) == 1 + 6 * 3
    assert "uAP" in (tmp_path / "eval_results.txt").read_text()
    gallery = tmp_path / "gallery"
    for c in ("adenoma", "hyperplastic"):
        (gallery / c).mkdir(parents=True)
    refs = sorted((tmp_path / "twins" / "val_ref").iterdir())
    for i, p in enumerate(refs):
        (gallery / ("adenoma" if i % 2 else "hyperplastic") / p.name).write_bytes(p.read_bytes())
    query = str(sorted((tmp_path / "twins" / "val_query").iterdir())[0])
    monkeypatch.setattr(sys, "argv", ["predict_retrieval.py", *common, "--query", query, "--gallery",
                                      str(gallery), "--k", "4", "--save-index", str(tmp_path / "g.npz")])
    predict_retrieval.main(predict_retrieval.get_args())
    result = __import__("json").loads((tmp_path / "Predictions" / "retrieval-gallery" / "Q0000.json").read_text())
    assert len(result["neighbours"]) == 4 and result["vote"]["sentence"].endswith(result["vote"]["prediction"])
    assert (tmp_path / "Predictions" / "retrieval-gallery" / "Q0000.png").is_file()
    monkeypatch.setattr(sys, "argv", ["predict_retrieval.py", *common, "--query", query, "--gallery",
                                      str(tmp_path / "g.npz"), "--k", "4"])
    predict_retrieval.main(predict_retrieval.get_args())
    again = __import__("json").loads((tmp_path / "Predictions" / "retrieval-g" / "Q0000.json").read_text())
    assert [n["reference"] for n in again["neighbours"]] == [n["reference"] for n in result["neighbours"]]
    ts = tmp_path / "desc.pt"
    monkeypatch.setattr(sys, "argv", ["predict_retrieval.py", *common, "--export-torchscript", str(ts)])
    predict_retrieval.main(predict_retrieval.get_args())
    assert torch.jit.load(str(ts))(torch.zeros(1, 3, 32, 32)).shape == (1, 192)


def test_torchscript_descriptor_model_is_used_as_it_is(tmp_path, monkeypatch, capsys):
    """#17: an SSCD-style TorchScript file (trunk -> GeM -> Linear, traced) evaluates through
    --descriptor-model: its descriptors are the file's own output, L2-normalised."""
    import eval_retrieval
    import torchvision
    from gissl import retrieval as R
    from gissl.retrieval_data import synthetic_twin_root, twin_set

    class SSCDLike(torch.nn.Module):  # SSCD's Model(TV_RESNET50, 512, 3.0): trunk, GeM p=3, Linear
        def __init__(self):
            super().__init__()
            trunk = torchvision.models.resnet18()
            self.trunk = torch.nn.Sequential(*list(trunk.children())[:-2])
            self.fc = torch.nn.Linear(512, 32)

        def forward(self, x):
            x = self.trunk(x).clamp(min=1e-6).pow(3.0).mean((2, 3)).pow(1 / 3.0)
            return self.fc(x)

    torch.manual_seed(0)
    source = SSCDLike().eval()
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.jit.trace(source, torch.zeros(1, 3, 32, 32)).save(str(path))
    model = R.ScriptedDescriptor(path).eval()
    twin = twin_set(synthetic_twin_root())
    got = R.extract_descriptors(model, twin["queries"][:3], image_size=32, batch_size=2, device=torch.device("cpu"),
                                amp=False)
    from gissl.retrieval_data import ImageListDataset
    images = torch.stack([ImageListDataset(twin["queries"][:3], 32)[i]["image"] for i in range(3)])
    with torch.no_grad():
        want = torch.nn.functional.normalize(source(images), dim=1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    monkeypatch.chdir(tmp_path)
    eval_retrieval.main(eval_retrieval.get_args(["--descriptor-model", str(path), "--image-size", "32",
                                                 "--workers", "0", "--device", "cpu", "--no-amp"]))
    assert "Copy-detection retrieval results for sscd_disc_mixup.torchscript.pt" in capsys.readouterr().out
    with pytest.raises(UserError, match="not a TorchScript model"):
        R.ScriptedDescriptor(tmp_path / "eval_results.txt")


@pytest.mark.parametrize("layout", ["torchvision", "classy"])
def test_sscd_torchvision_file_gives_sscd_descriptor(tmp_path, layout):
    """#17: SSCD's ``*.torchvision.pt`` (``Model("TV_RESNET18", 32, 3.0).state_dict()``: ``backbone.*``,
    the torchvision trunk with ``fc`` = Linear(512, dims) after GeM p = 3) gives SSCD's descriptor,
    L2(fc(GeM(trunk))), re-derived here from SSCD's definition (GeM: clamp 1e-6, power 3, mean, 1/3);
    so does its ``*.classy.pt`` (``Model("CV_RESNET18", 32, 3.0)``: Classy Vision names, the Linear
    as ``embeddings.1``; its model rebuilt in test_official_checkpoints.py)."""
    import eval_retrieval
    import torchvision
    from gissl import retrieval as R
    from gissl.retrieval_data import ImageListDataset, synthetic_twin_root, twin_set
    torch.manual_seed(0)
    paths = twin_set(synthetic_twin_root())["queries"][:3]
    images = torch.stack([ImageListDataset(paths, 32)[i]["image"] for i in range(3)])
    path = tmp_path / f"sscd_disc_mixup.{layout}.pt"
    if layout == "classy":
        from test_official_checkpoints import _randomise_bn, _SSCDClassyModel
        ref = _randomise_bn(_SSCDClassyModel(False, [2, 2, 2, 2], 32))
        torch.save(ref.state_dict(), path)
        with torch.no_grad():
            want = ref(images).numpy()
    else:
        trunk = torchvision.models.resnet18(num_classes=32).eval()
        torch.save({f"backbone.{k}": v for k, v in trunk.state_dict().items()}, path)
        with torch.no_grad():
            x = torch.nn.Sequential(*list(trunk.children())[:-2])(images)
            gem = x.reshape(*x.shape[:2], -1).clamp(min=1e-6).pow(3.0).mean(dim=2).pow(1 / 3.0)
            want = torch.nn.functional.normalize(trunk.fc(gem), dim=1).numpy()
    args = eval_retrieval.get_args(["--untrained", "--pretraining", "ImageNet_class", "--checkpoint", str(path),
                                    "--architecture", "resnet18", "--embedding-dim", "32", "--image-size", "32",
                                    "--use-head", "--device", "cpu", "--no-amp"])
    model = eval_retrieval.load(args, torch.device("cpu"))
    got = R.extract_descriptors(model, paths, image_size=32, batch_size=3, device=torch.device("cpu"),
                                use_head=True, amp=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_endofinder_training_checkpoint_gives_its_encoder_and_head(tmp_path):
    """#17: EndoFinder's checkpoint-N.pth as its polyp_pretrain.py saves it (MAE's save_model:
    model / optimizer / epoch / scaler / args Namespace; the model's own keys: the ViT encoder,
    target_embed (the fixed mask-patch summer), head (Linear to 512), the MAE decoder) loads the
    encoder, and its head becomes the retrieval projection. Built for vit_t widths (the layout is
    the same at ViT-L's)."""
    import argparse

    import eval_retrieval
    from gissl import retrieval as R
    from gissl.models import build_encoder
    from gissl.retrieval_data import synthetic_twin_root, twin_set
    torch.manual_seed(0)
    source = build_encoder("vit_t").eval()
    d, dec = source.embed_dim, 32
    model_state = dict(source.state_dict())
    model_state.update({"target_embed.proj.weight": torch.ones(1, 1, 16, 16), "head.weight": torch.randn(512, d),
                        "head.bias": torch.randn(512), "decoder_embed.weight": torch.randn(dec, d),
                        "decoder_embed.bias": torch.zeros(dec), "mask_token": torch.zeros(1, 1, dec),
                        "decoder_pos_embed": torch.zeros(1, 197, dec), "decoder_blocks.0.norm1.weight": torch.ones(dec),
                        "decoder_norm.weight": torch.ones(dec), "decoder_pred.weight": torch.randn(768, dec)})
    args = argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.5, batch_size=32, epochs=100,
                              entropy_weight=5, mse_weight=0.5, blr=1e-3, output_dir="./output_dir")
    path = tmp_path / "checkpoint-99.pth"
    torch.save({"model": model_state, "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).state_dict(),
                "epoch": 99, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                        "growth_interval": 2000, "_growth_tracker": 0}, "args": args}, path)
    flags = ["--untrained", "--pretraining", "ImageNet_self", "--ss-framework", "mae", "--checkpoint", str(path),
             "--architecture", "vit_t", "--mask-ratio", "0", "--image-size", "224", "--device", "cpu", "--no-amp"]
    model = eval_retrieval.load(eval_retrieval.get_args(flags), torch.device("cpu"))
    for k, v in source.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    assert torch.equal(model.head.weight, model_state["head.weight"])
    paths = twin_set(synthetic_twin_root())["queries"][:2]
    cls = R.extract_descriptors(model, paths, image_size=224, batch_size=2, device=torch.device("cpu"), amp=False)
    from gissl.retrieval_data import ImageListDataset
    images = torch.stack([ImageListDataset(paths, 224)[i]["image"] for i in range(2)])
    with torch.no_grad():  # EndoFinder's descriptor: the CLS token after the final norm, L2-normalised
        np.testing.assert_allclose(cls, torch.nn.functional.normalize(source(images), dim=1).numpy(),
                                   rtol=1e-5, atol=1e-6)
