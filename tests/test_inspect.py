"""``python -m gissl.checkpoint FILE``: what a checkpoint file is, without building a model (issue #17 item 4).

The files are written in the layouts their training code saves (the builders of
test_official_checkpoints.py: MoCo v3 / MoCo v2 / MAE with a Namespace / DINO / TorchScript), plus
gissl's own run checkpoint (``gissl.engine``'s snapshot keys) and library state dicts; the printed
layout, prefix, architecture and dropped keys are checked.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from gissl.checkpoint import describe_checkpoint, main
from gissl.models import build_encoder
from test_official_checkpoints import _mae_args, _mocov2_file, _mocov3_file, _prefixed, _Tiny

REPO = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _line(out, name):
    return next(line for line in out.splitlines() if line.startswith(name))


def _weights(arch, seed=0, **kwargs):
    """Random tensors in the shapes of gissl's ``arch`` (built on the meta device: the CPU init of
    a ViT costs seconds, and only names and shapes matter here)."""
    with torch.device("meta"):
        shapes = build_encoder(arch, **kwargs).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
            for k, v in shapes.items()}


def _vit_t(seed=0):
    return _weights("vit_t", seed)


def _resnet18(seed=0):
    return _weights("resnet18", seed)


def test_module_prints_a_mocov3_vit_s_file_and_exits_2_on_junk(tmp_path):
    """Two runs of ``python -m gissl.checkpoint`` (together: each pays the torch import)."""
    state = _weights("vit_s", num_heads=12)
    projector = {"head.0.weight": torch.randn(64, 384), "head.1.weight": torch.ones(64), "head.3.weight": torch.randn(16, 64)}
    base = {**state, **projector}
    _mocov3_file(tmp_path / "vit-s-300ep.pth.tar", base, {**base, "cls_token": state["cls_token"] + 1})
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "gissl.checkpoint", str(tmp_path / name)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for name in ("vit-s-300ep.pth.tar", "notes.pth")]
    (out, err), (out2, err2) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0, err
    assert _line(out, "layout").endswith("MoCo v3 main_moco.py checkpoint ('arch' 'vit_small', epoch 300)")
    assert _line(out, "encoder").startswith("encoder     under 'module.base_encoder.': a ViT-S/16 (384-d, 12 blocks")
    assert "150 tensors" in _line(out, "encoder")
    assert "(MoCo v3 vits.py: 12 attention heads)" in _line(out, "file says")
    assert _line(out, "dropped") == ("dropped     under the prefix: head.* (3); beside the encoder: "
                                     "module.momentum_encoder.* (153), module.predictor.* (10)")
    assert _line(out, "gissl") == "gissl       --architecture vit_s --ss-framework mocov3: loads strictly"
    assert procs[1].returncode == 2 and out2 == ""
    assert err2.count("\n") == 1 and err2.startswith("error: cannot read checkpoint") and "notes.pth" in err2


def test_mocov3_file_and_a_6_head_vit_s(tmp_path, capsys):
    """--architecture vit_s alone builds timm's 6-head ViT-S, which the file's 'arch' refuses."""
    state = _vit_t()
    _mocov3_file(tmp_path / "vit-t.pth.tar", state, state, arch="vit_tiny")
    code, out, _ = _run([tmp_path / "vit-t.pth.tar", "--architecture", "vit_s"], capsys)
    assert code == 0
    assert "does not load strictly: mis-shaped (" in _line(out, "gissl")
    assert "cls_token (file (1, 1, 192), model (1, 1, 384))" in _line(out, "gissl")


def test_mocov2_file_encoder_q_and_dropped_copies(tmp_path, capsys):
    _mocov2_file(tmp_path / "moco_v2_200ep_pretrain.pth.tar", _resnet18(0), _resnet18(1))
    code, out, _ = _run([tmp_path / "moco_v2_200ep_pretrain.pth.tar"], capsys)
    assert code == 0
    assert _line(out, "layout").endswith("MoCo v1/v2 main_moco.py checkpoint ('arch' 'resnet18', epoch 200)")
    assert "under 'module.encoder_q.': a ResNet-18 (conv1/layer1..4 keys)" in _line(out, "encoder")
    assert _line(out, "dropped") == ("dropped     under the prefix: fc.* (4); beside the encoder: "
                                     "module.encoder_k.* (124), module.queue, module.queue_ptr")
    assert _line(out, "gissl").endswith("--architecture resnet18: loads strictly")
    # the wrong encoder: the keys are named, as the loader names them
    code, out, _ = _run([tmp_path / "moco_v2_200ep_pretrain.pth.tar", "--architecture", "resnet50"], capsys)
    assert code == 0
    line = _line(out, "gissl")
    assert line.startswith("gissl       --architecture resnet50: does not load strictly: missing (198): "
                           "layer1.0.conv3.weight")
    assert "mis-shaped (23): layer1.0.conv1.weight (file (64, 64, 3, 3), model (64, 64, 1, 1))" in line


def test_mae_checkpoint_with_namespace_args(tmp_path, capsys):
    decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 192),
               "decoder_pos_embed": torch.zeros(1, 197, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
               "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(768, 32)}
    torch.save({"model": {**_vit_t(), **decoder},
                "optimizer": torch.optim.AdamW([nn.Parameter(torch.zeros(2))]).state_dict(), "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": _mae_args()}, tmp_path / "checkpoint-799.pth")
    code, out, _ = _run([tmp_path / "checkpoint-799.pth"], capsys)
    assert code == 0
    assert _line(out, "layout").endswith("MAE main_pretrain.py checkpoint (encoder + decoder, epoch 799)")
    assert _line(out, "file says") == "file says   'args': model 'mae_vit_base_patch16'"
    assert "at the top level (no prefix): a ViT-T/16 (192-d, 12 blocks" in _line(out, "encoder")
    assert _line(out, "dropped") == ("dropped     under the prefix: decoder_blocks.* (1), decoder_embed.* (1), decoder_norm.* (1), "
                                     "decoder_pos_embed, decoder_pred.* (1), mask_token")
    assert _line(out, "gissl").endswith("--architecture vit_t: loads strictly")


def test_dino_training_checkpoint_is_described_with_its_teacher(tmp_path, capsys):
    backbone, head = _vit_t(), {"mlp.0.weight": torch.randn(8, 192), "last_layer.weight_g": torch.ones(16, 1)}
    torch.save({"student": {**_prefixed("module.backbone.", backbone), **_prefixed("module.head.", head)},
                "teacher": {**_prefixed("backbone.", backbone), **_prefixed("head.", head)}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=65536),
                "dino_loss": {"center": torch.zeros(1, 16)}}, tmp_path / "checkpoint.pth")
    code, out, _ = _run([tmp_path / "checkpoint.pth"], capsys)
    assert code == 0
    assert _line(out, "layout").endswith("DINO main_dino.py training checkpoint (student/teacher, epoch 100)")
    assert "under 'backbone.': a ViT-T/16" in _line(out, "encoder")
    assert _line(out, "dropped") == "dropped     beside the encoder: head.* (2)"
    assert _line(out, "gissl") == "gissl       --architecture vit_t: loads strictly"  # the teacher, as the loader


def test_torchscript_is_named_without_running_it(tmp_path, capsys):
    torch.jit.save(torch.jit.script(_Tiny()), str(tmp_path / "sscd_disc_mixup.torchscript.pt"))
    code, out, _ = _run([tmp_path / "sscd_disc_mixup.torchscript.pt"], capsys)
    assert code == 0
    assert "TorchScript archive (torch.jit.save)" in _line(out, "file")
    assert "TorchScript program, not a checkpoint of weights (code: " in _line(out, "layout")
    assert "sscd_disc_mixup.torchvision.pt" in _line(out, "refused")


def test_gissl_pretrain_and_finetuned_checkpoints_show_their_flags(tmp_path, capsys):
    enc, other = _resnet18(0), _resnet18(1)
    flags = {"task": "pretraining", "arch": "resnet18", "pretraining": "random", "ss_framework": "mocov3",
             "dataset": "folder", "image_size": 64, "lr": 0.1}
    snapshot = {"optimizer": {}, "scaler": None, "scheduler": None, "epoch": 3, "best_metric": None, "best_epoch": None,
                "global_step": 30, "partial": None, "extra": None, "nonfinite_skipped": 0, "rng": []}
    torch.save({"model": {**_prefixed("encoder.", enc), **_prefixed("momentum_encoder.", other),
                          "projector.0.weight": torch.randn(4, 512), "predictor.0.weight": torch.randn(4, 4)},
                "args": flags, **snapshot}, tmp_path / "checkpoint.pth")
    torch.save({"model": {**_prefixed("encoder.", enc), "head.weight": torch.randn(3, 512), "head.bias": torch.zeros(3)},
                "args": {**flags, "task": "classification", "pretraining": "Hyperkvasir", "frozen": False,
                         "dataset": "Hyperkvasir_anatomical"}, **snapshot, "best_metric": 0.75}, tmp_path / "best.pth")
    torch.save(enc, tmp_path / "encoder.pth")
    code, out, _ = _run([tmp_path / "checkpoint.pth"], capsys)
    assert code == 0
    assert _line(out, "layout").endswith("gissl pretrain.py full training state (checkpoint.pth, epoch 3)")
    assert _line(out, "stored") == ("stored      epoch 3, global_step 30, task pretraining, arch resnet18, "
                                    "pretraining random, ss_framework mocov3, dataset folder, image_size 64")
    assert "under 'encoder.': a ResNet-18" in _line(out, "encoder")
    assert _line(out, "dropped") == ("dropped     beside the encoder: momentum_encoder.* (120), projector.* (1), "
                                     "predictor.* (1)")
    code, out, _ = _run([tmp_path / "best.pth", "--architecture", "resnet18"], capsys)
    assert code == 0
    assert _line(out, "layout").endswith("gissl finetuned checkpoint written by train_classification.py, epoch 3")
    assert "task classification" in _line(out, "stored") and "frozen False" in _line(out, "stored")
    assert _line(out, "gissl").endswith("--architecture resnet18: loads strictly")
    code, out, _ = _run([tmp_path / "encoder.pth"], capsys)
    assert code == 0
    assert _line(out, "layout").startswith("layout      gissl pretrain.py encoder.pth: flat encoder state dict")
    assert "dropped" not in out


def test_library_state_dicts_and_json(tmp_path, capsys):
    from safetensors.torch import save_file
    save_file({**_vit_t(), "head.weight": torch.randn(1000, 192), "head.bias": torch.zeros(1000)},
              str(tmp_path / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"))
    torch.save(_prefixed("backbone.", {**_resnet18(), "fc.weight": torch.randn(512, 512), "fc.bias": torch.zeros(512)}),
               tmp_path / "sscd_disc_mixup.torchvision.pt")
    code, out, _ = _run([tmp_path / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors", "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["format"] == "safetensors" and d["layout"] == "timm"
    assert d["encoder"]["prefix"] == "" and d["encoder"]["architecture"] == "vit_t"
    assert d["encoder"]["dropped"] == ["head.* (2)"] and d["encoder"]["fit"]["loads"] is True
    d = describe_checkpoint(tmp_path / "sscd_disc_mixup.torchvision.pt", "resnet18")
    assert d["layout"] == "sscd-torchvision" and d["encoder"]["prefix"] == "backbone."
    assert d["encoder"]["fit"] == {"architecture": "resnet18", "ss_framework": None, "loads": True, "missing": [],
                                   "unexpected": [], "misshaped": [], "error": None, "given": True}


def test_resnext101_32x4d_file_is_named(tmp_path, capsys):
    """#17: a flat timm ``resnext101_32x4d`` file (with its 1000-class fc) is named a ResNeXt-101 32x4d
    (grouped 3x3 convs: weight (128, 4, 3, 3) at the first stage) that loads strictly into
    ``--architecture resnext101_32x4d``; checked against resnet50 it names the keys that differ.
    Ungrouped ResNet-101 and torchvision's ResNeXt-101 32x8d are told apart by the same rule."""
    import torchvision

    from gissl.models import describe_state_dict
    path = tmp_path / "resnext101_32x4d.gluon_in1k.pth"
    torch.save({**_weights("resnext101_32x4d"), "fc.weight": torch.randn(1000, 2048), "fc.bias": torch.zeros(1000)},
               path)
    code, out, _ = _run([path], capsys)
    assert code == 0
    assert "a ResNeXt-101 32x4d (conv1/layer1..4 keys)" in _line(out, "encoder")
    assert _line(out, "gissl").endswith("--architecture resnext101_32x4d: loads strictly")
    code, out, _ = _run([path, "--architecture", "resnet50"], capsys)
    assert code == 0
    fit = _line(out, "gissl")
    assert "--architecture resnet50: does not load strictly" in fit
    assert "unexpected (" in fit and "layer3.6.conv1.weight" in fit
    assert "layer1.0.conv1.weight (file (128, 64, 1, 1), model (64, 64, 1, 1))" in fit
    with torch.device("meta"):
        r101, x8 = torchvision.models.resnet101().state_dict(), torchvision.models.resnext101_32x8d().state_dict()
    assert describe_state_dict(r101) == ("resnet", "a ResNet-101 (conv1/layer1..4 keys)")
    assert describe_state_dict(x8) == ("resnet", "a ResNeXt-101 32x8d (conv1/layer1..4 keys)")


def test_not_a_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "meta.pth")
    for path, says in ((tmp_path / "meta.pth", "holds no state dict of tensors (found: epoch, args)"),
                       (tmp_path / "nope.pth", "does not exist")):
        code, out, err = _run([path], capsys)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err
