"""Fast defaults keep results: batched eval equals batch-1 eval, ``--compile`` gives the eager
loss, channels_last leaves the optimiser's parameters in place."""
import shutil

import pytest
import torch

from gissl import classification as C, cli, depth as D, engine, loaders, optim, segmentation as S
from gissl.errors import UserError
from gissl.metrics import classification_metrics, summarize_segmentation
from gissl.models import build_encoder
from gissl.models.dpt import DPT
from gissl.models.vit import VisionTransformer

SIZE, ORIG, COUNT = 64, (45, 70), 5


def samples(task):
    """In-memory eval samples as the datasets give them with ``original=True``; sample 2 has
    another original size, so batches hold both one-size (stacked) and mixed-size originals."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(COUNT):
        image = torch.randn(3, SIZE, SIZE, generator=g)
        orig = ORIG if i != 2 else (52, 38)
        if task == "segmentation":
            mask = torch.rand(1, *orig, generator=g) > 0.6
            out.append({"image": image, "mask": torch.zeros(1, SIZE, SIZE), "mask_orig": mask,
                        "path": f"{i}.jpg", "index": i})
        elif task == "depth":
            d = 5 + 90 * torch.rand(1, *orig, generator=g)
            d[..., :7] = 0  # invalid pixels
            out.append({"image": image, "depth": torch.nn.functional.interpolate(d[None], (SIZE, SIZE))[0],
                        "depth_orig": d, "path": f"{i}_color.png", "index": i})
        else:
            out.append({"image": image, "label": torch.tensor(i % 3), "index": i})
    return out


def loader(data, batch_size):
    return loaders.make_loader(data, batch_size=batch_size, train=False, workers=0)


def dpt(task):
    torch.manual_seed(0)
    return DPT(build_encoder("resnet18"), task, features=16).eval()


@pytest.mark.parametrize("amp", [False, True])
def test_segmentation_batched_eval_equals_batch_1(amp):
    model, data = dpt("segmentation"), samples("segmentation")
    one = S.evaluate(model, loader(data, 1), torch.device("cpu"), amp=amp)
    many = S.evaluate(model, loader(data, 3), torch.device("cpu"), amp=amp)
    tol = 1e-6 if not amp else 2e-2  # bf16 kernels may pick other blockings per batch size
    assert one["paths"] == many["paths"]
    for k in ("dice", "iou", "precision", "recall"):
        assert torch.allclose(one[k], many[k], atol=tol), k
    a, b = summarize_segmentation(one), summarize_segmentation(many)
    assert abs(a["Dice"] - b["Dice"]) <= tol


def test_depth_batched_eval_equals_batch_1():
    torch.manual_seed(0)
    model, data = dpt("depth"), samples("depth")
    one = D.evaluate(model, loader(data, 1), torch.device("cpu"), "scale-shift", amp=False)
    many = D.evaluate(model, loader(data, 4), torch.device("cpu"), "scale-shift", amp=False)
    for k in ("rmse", "abs", "rel_median"):
        assert torch.allclose(one[k], many[k], rtol=1e-5, atol=1e-5), k
    assert D.summarize(one, "scale-shift")["RMSE"] == pytest.approx(D.summarize(many, "scale-shift")["RMSE"], rel=1e-5)


@pytest.mark.parametrize("arch", ["vit_t", "resnet18"])
def test_classification_batched_eval_equals_batch_1(arch):
    torch.manual_seed(0)
    model, data = C.Classifier(build_encoder(arch), 3).eval(), samples("classification")
    one = C.predict(model, loader(data, 1), torch.device("cpu"))
    many = C.predict(model, loader(data, 4), torch.device("cpu"))
    assert torch.allclose(one["probs"], many["probs"], atol=1e-5)
    assert torch.equal(one["preds"], many["preds"]) and torch.equal(one["targets"], many["targets"])
    m1 = classification_metrics(one["targets"], one["preds"], num_classes=3)
    m2 = classification_metrics(many["targets"], many["preds"], num_classes=3)
    assert m1["accuracy"] == m2["accuracy"] and m1["macro_f1"] == m2["macro_f1"]


def test_classification_predict_amp_runs_in_bf16_on_cpu():
    torch.manual_seed(0)
    model, data = C.Classifier(build_encoder("vit_t"), 3).eval(), samples("classification")
    fp32 = C.predict(model, loader(data, 4), torch.device("cpu"))
    bf16 = C.predict(model, loader(data, 4), torch.device("cpu"), amp=True)
    assert bf16["probs"].dtype == torch.float32
    assert not torch.equal(fp32["probs"], bf16["probs"])  # autocast was really on
    assert torch.allclose(fp32["probs"], bf16["probs"], atol=5e-2)


def test_channels_last_keeps_parameters_and_optimizer():
    model = build_encoder("resnet18")
    opt = optim.build_optimizer(model, 1e-3)
    before = [id(p) for p in model.parameters()]
    engine.to_channels_last(model, "cpu", True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert [id(p) for p in model.parameters()] == before  # the optimiser still holds them
    with engine.autocast("cpu"):
        model(torch.randn(2, 3, 32, 32)).float().pow(2).mean().backward()
    old = model.conv1.weight.detach().clone()
    opt.step()
    assert not torch.equal(old, model.conv1.weight)
    vit = build_encoder("vit_t")
    engine.to_channels_last(vit, "cpu", False)
    assert vit.patch_embed.proj.weight.is_contiguous()


def test_compile_flag_and_missing_compiler(monkeypatch):
    args = cli.task_parser("segmentation", "t", stage="train").parse_args(["--compile"])
    assert args.compile is True
    assert cli.task_parser("segmentation", "t", stage="train").parse_args([]).compile is False
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        engine.compile_model(torch.nn.Linear(2, 2), "cpu")


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                    reason="torch.compile on CPU needs a C++ compiler and none is on PATH")
def test_compile_gives_the_eager_loss():
    torch._dynamo.reset()
    torch.manual_seed(0)
    # a 2-block ViT: the same operations as vit_b, compiled in seconds rather than minutes
    encoder = VisionTransformer(embed_dim=32, depth=2, num_heads=2, img_size=32, out_indices=(0, 1))
    model = C.Classifier(encoder, 3).train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    losses = C.make_compute_losses(torch.ones(3))
    batch = {"image": images, "label": labels}
    with engine.autocast("cpu"):
        eager = losses(model, batch)["loss"]
        compiled = losses(engine.compile_model(model, "cpu"), batch)["loss"]
    # bf16 autocast: compiled kernels fuse and round differently, within bf16 precision
    assert torch.isfinite(compiled)
    assert compiled.item() == pytest.approx(eager.item(), rel=2e-2, abs=2e-2)
    compiled.backward()
    assert model.head.weight.grad is not None


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                    reason="torch.compile on CPU needs a C++ compiler and none is on PATH")
def test_compiled_eval_gives_the_eager_metrics():
    torch._dynamo.reset()
    encoder = VisionTransformer(embed_dim=32, depth=4, num_heads=2, img_size=SIZE, out_indices=(0, 1, 2, 3))
    model, data = DPT(encoder, "segmentation", features=8).eval(), samples("segmentation")
    eager = S.evaluate(model, loader(data, 5), torch.device("cpu"), amp=False)
    compiled = S.evaluate(engine.compile_model(model, "cpu"), loader(data, 5), torch.device("cpu"), amp=False)
    assert torch.allclose(eager["dice"], compiled["dice"], atol=1e-3)
    args = cli.task_parser("segmentation", "t", stage="eval").parse_args(["--compile"])
    assert args.compile is True


def test_eval_compile_reaches_detection_and_retrieval_models(monkeypatch):
    """eval --compile compiles what eval runs: the detector's backbone, the retrieval embed()."""
    import eval_detection
    import eval_retrieval
    compiled = []
    monkeypatch.setattr(eval_detection, "compile_model", lambda fn, device: compiled.append(fn) or fn)
    monkeypatch.setattr(eval_retrieval, "compile_model", lambda fn, device: compiled.append(fn) or fn)
    args = eval_detection.get_args(["--architecture", "resnet18", "--image-size", "64", "--compile"])
    monkeypatch.setattr(cli, "finetuned", lambda args, *a, **kw: ({"model": {}}, "x.pth"))
    monkeypatch.setattr(cli, "load_weights", lambda model, state, path: model)
    _, model = eval_detection.load(args, torch.device("cpu"))
    assert compiled == [model.backbone] and not model.training
    model = eval_retrieval.load(eval_retrieval.get_args(["--architecture", "resnet18", "--image-size", "32",
                                                         "--untrained", "--compile", "--device", "cpu"]),
                                torch.device("cpu"))
    assert len(compiled) == 2 and compiled[-1] == model.embed and "embed" in vars(model)  # set on the model
    assert not model.training
