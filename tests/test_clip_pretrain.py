"""CLIP, SLIP and SimCLR as pretrain.py methods (#18): the modules' losses equal direct
transcriptions of the papers' formulas on the same batch (CLIP Fig. 3's symmetric cross-entropy,
SLIP's NT-Xent with self-similarities masked), SLIP = CLIP + ssl_scale x SimCLR, the logit scale
clamp; pretrain.py end to end on a tiny captions.csv folder: checkpoint with both towers, the
projections, logit_scale and the tokenizer, encoder.pth loading into a task script, a resumed run
equal to an uninterrupted one, bad caption rows exit 2, SimCLR image-only on an image folder."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pretrain
import train_classification
from gissl import cli
from gissl.checkpoint import load_file
from gissl.models import build_encoder
from gissl.models.text import TextTransformer
from gissl.ssl import SLIP, SimCLR
from gissl.ssl.clip import CLIP, MAX_LOGIT_SCALE, load_image_text_model

TINY_TEXT = ["--text-width", "32", "--text-layers", "1", "--text-heads", "2", "--embed-dim", "16",
             "--dim", "16", "--mlp-dim", "32", "--context-length", "16"]


def _clip_reference(u, t, scale):
    # CLIP Fig. 3: logits = s * norm(I) norm(T)^T; loss = (CE(logits, arange) + CE(logits^T, arange)) / 2
    logits = scale * F.normalize(u, dim=1) @ F.normalize(t, dim=1).T
    labels = torch.arange(len(u))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _nt_xent_reference(z1, z2, tau):
    # SLIP losses.py: anchors of view a score all of view b (positive i) and view a except i
    n = len(z1)
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    loss = 0
    for a, b in ((z1, z2), (z2, z1)):
        total = 0
        for i in range(n):
            cands = torch.cat([a[i] @ b.T, torch.stack([a[i] @ a[j] for j in range(n) if j != i])]) / tau
            total = total - torch.log_softmax(cands, 0)[i]
        loss = loss + total / n / 2
    return loss


def _models():
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=600, context_length=8, width=32, layers=1, heads=2, embed_dim=16)
    slip = SLIP(build_encoder("resnet18"), text=text, embed_dim=16, mlp_dim=32, dim=8, ssl_scale=0.7).eval()
    return slip


def test_losses_equal_paper_transcriptions():
    slip = _models()
    g = torch.Generator().manual_seed(1)
    x, x1, x2 = (torch.randn(4, 3, 32, 32, generator=g) for _ in range(3))
    tokens = torch.randint(1, 500, (4, 8), generator=g)
    tokens[:, -1] = 599  # end-of-text: the row's largest id
    with torch.no_grad():
        slip.logit_scale.fill_(math.log(20.0))
        out = slip(x, x1, x2, tokens)
        u = slip.encoder(x) @ slip.image_projection
        clip = _clip_reference(u, slip.text(tokens), 20.0)
        ssl = _nt_xent_reference(slip.image_mlp(slip.encoder(x1)), slip.image_mlp(slip.encoder(x2)), 0.1)
        assert torch.allclose(out["clip"], clip, atol=1e-5) and torch.allclose(out["simclr"], 0.7 * ssl, atol=1e-5)
        simclr = SimCLR(slip.encoder, mlp_dim=32, dim=8)
        simclr.image_mlp.load_state_dict(slip.image_mlp.state_dict())
        assert torch.allclose(simclr.eval()(x1, x2)["simclr"], ssl, atol=1e-5)
        clip_only = CLIP(slip.encoder, text=slip.text, embed_dim=16)
        clip_only.load_state_dict({k: v for k, v in slip.state_dict().items() if not k.startswith("image_mlp.")})
        assert torch.allclose(clip_only(x, tokens)["clip"], clip, atol=1e-5)
    assert math.isclose(CLIP(build_encoder("resnet18"), text=slip.text, embed_dim=16).logit_scale.item(),
                        math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        slip.logit_scale.fill_(7.0)
    slip.clamp_logit_scale()
    assert math.isclose(slip.logit_scale.item(), math.log(100), rel_tol=1e-6) and MAX_LOGIT_SCALE == math.log(100)


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / f"f{i}.jpg", quality=90)
        rows += [f"f{i}.jpg,endoscopy image of the {('cecum', 'pylorus', 'z line')[i % 3]}",
                 f"f{i}.jpg,frame {i} with {'a polyp' if i % 2 else 'no polyp'}"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def _parse(module, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [module.__file__] + argv)
    return module.get_args()


def _pretrain(monkeypatch, out, root, framework, epochs, extra=()):
    argv = ["--ss-framework", framework, "--architecture", "vit_t", "--data-root", str(root), "--image-size", "32",
            "--epochs", str(epochs), "--batch-size", "4", "--workers", "0", "--output-dir", str(out), *TINY_TEXT,
            *extra]
    pretrain.main(_parse(pretrain, monkeypatch, argv))
    return out / f"vit_t-{framework}-{'captions' if '--dataset' not in extra else extra[extra.index('--dataset') + 1]}"


def test_slip_pretrain_checkpoint_resume_and_encoder(caption_folder, tmp_path, monkeypatch, capsys):
    run = _pretrain(monkeypatch, tmp_path / "a", caption_folder, "slip", 1)
    first = load_file(run / "checkpoint.pth")
    capsys.readouterr()
    _pretrain(monkeypatch, tmp_path / "a", caption_folder, "slip", 1)  # same command: resumes, nothing to do
    assert "Resuming from" in capsys.readouterr().out
    _pretrain(monkeypatch, tmp_path / "a", caption_folder, "slip", 2)  # one more epoch from the first
    state = load_file(run / "checkpoint.pth")
    assert first["epoch"] == 1 and state["epoch"] == 2 and state["extra"] == first["extra"]
    assert not torch.equal(state["model"]["text.text_projection"], first["model"]["text.text_projection"])
    keys = set(state["model"])
    assert {"image_projection", "logit_scale", "text.text_projection", "text.token_embedding.weight"} <= keys
    assert any(k.startswith("image_mlp.") for k in keys) and state["extra"]["tokenizer"]["kind"] == "clip-bpe"
    assert 0 <= float(state["model"]["logit_scale"]) <= math.log(100)
    assert float(state["model"]["logit_scale"]) != pytest.approx(math.log(1 / 0.07))  # it is learnt
    model, tokenizer = load_image_text_model(str(run / "checkpoint.pth"))
    assert torch.equal(model.image_projection, state["model"]["image_projection"])
    assert tokenizer(["endoscopy image of the cecum"], context_length=16).shape == (1, 16)
    encoder = load_file(run / "encoder.pth")
    args = _parse(train_classification, monkeypatch, [
        "--architecture", "vit_t", "--pretraining", "Hyperkvasir", "--ss-framework", "slip",
        "--checkpoint", str(run / "encoder.pth"), "--image-size", "32"])
    for k, v in cli.encoder(args, img_size=32).state_dict().items():
        assert torch.equal(v, encoder[k]), k


def test_bad_rows_exit_2_and_simclr_on_images(caption_folder, tmp_path, monkeypatch, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(caption_folder, broken)
    with open(broken / "captions.csv", "a") as f:
        f.write("gone.jpg,a frame that was deleted\n")
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--ss-framework", "clip", "--architecture", "vit_t",
                                      "--data-root", str(broken), "--output-dir", str(tmp_path / "x"), *TINY_TEXT])
    with pytest.raises(SystemExit) as e:
        cli.run(pretrain.main, pretrain.get_args)
    assert e.value.code == 2 and "gone.jpg" in capsys.readouterr().err
    for argv in (["--ss-framework", "clip", "--dataset", "folder", "--data-root", str(broken)],
                 ["--ss-framework", "clip", "--text-width", "30", "--text-heads", "4"]):
        monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv, "--architecture", "vit_t"])
        with pytest.raises(SystemExit) as e:
            cli.run(pretrain.main, pretrain.get_args)
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    # SimCLR image-only: on a plain image folder, with --skip-bad-files not needed there
    out = _pretrain(monkeypatch, tmp_path / "s", caption_folder, "simclr", 1, ("--dataset", "folder"))
    state = load_file(out / "checkpoint.pth")
    assert any(k.startswith("image_mlp.") for k in state["model"]) and state["extra"] is None
