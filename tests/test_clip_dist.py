"""CLIP / SLIP pretraining under torchrun and with the official vocabulary (#18).

- BatchNorm synchronised across 2 CPU (gloo) processes equals one process's BatchNorm on the
  concatenated batch: outputs, running statistics and gradients (torch's SyncBatchNorm runs on
  GPUs only, so before this SLIP's SimCLR head normalised each rank's half on its own).
- ``pretrain.py --ss-framework slip`` under torchrun with 2 gloo processes trains the weights
  of one process on the same global batches (the built-in captioned synthetic set).
- ``pretrain.py --ss-framework clip --tokenizer <open_clip's bpe_simple_vocab_16e6.txt.gz>``:
  the checkpoint's tokenizer gives open_clip's ids, and ``eval_transfer.py --protocol zeroshot``
  runs on the checkpoint.
"""
import json
import math
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from gissl import dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ["--architecture", "vit_t", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--no-amp", "--text-width", "32", "--text-layers", "1", "--text-heads", "2", "--embed-dim", "16",
        "--dim", "16", "--mlp-dim", "32", "--context-length", "16"]


# --------------------------------------------------------------------------- BatchNorm across ranks

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_case(shape, seed):
    """A BatchNorm with non-trivial affine parameters and running statistics, an input batch
    (N = 2 x 4) and output weights w for the loss sum(w * y)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    bn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(c, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    x = torch.randn(shape, generator=g) * 3 + 2  # a mean far from 0: E[x^2] - E[x]^2 must stay exact
    return bn, x, torch.randn(shape, generator=g)


def _bn_worker(rank, world, port):
    cases = [((8, 5), 0), ((8, 3, 4, 2), 1)]
    refs = []
    for shape, seed in cases:  # one process, the whole batch: torch's BatchNorm
        bn, x, w = _bn_case(shape, seed)
        x.requires_grad_(True)
        (bn(x) * w).sum().backward()
        refs.append((bn, x.grad))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for (shape, seed), (ref_bn, ref_grad) in zip(cases, refs):
            bn, x, w = _bn_case(shape, seed)
            with torch.no_grad():
                ref_y = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True,
                                                       eps=bn.eps)
            synced = dist.convert_sync_batchnorm(torch.nn.Sequential(bn), "cpu")[0]
            assert type(synced).__name__.startswith("CpuSyncBatchNorm")
            assert synced.state_dict().keys() == bn.state_dict().keys()
            sl = slice(rank * 4, (rank + 1) * 4)
            xs = x[sl].clone().requires_grad_(True)
            y = synced(xs)
            torch.testing.assert_close(y, ref_y[sl], rtol=1e-5, atol=1e-5)
            # the loss of the global batch is the sum of the ranks' parts; the input gradient is
            # the one-process gradient's slice, the parameters' summed over ranks the one-process one
            (y * w[sl]).sum().backward()
            torch.testing.assert_close(xs.grad, ref_grad[sl], rtol=1e-4, atol=1e-5)
            for p, ref_p in zip((synced.weight, synced.bias), (ref_bn.weight, ref_bn.bias)):
                total = p.grad.clone()
                torch.distributed.all_reduce(total)
                torch.testing.assert_close(total, ref_p.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(synced.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(synced.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
            assert int(synced.num_batches_tracked) == 1
            synced.eval()  # evaluation: the running statistics, as BatchNorm
            torch.testing.assert_close(synced(x[sl]), ref_bn.eval()(x[sl]), rtol=1e-5, atol=1e-6)
        torch.distributed.barrier()  # both ranks done before either tears gloo down
    finally:
        torch.distributed.destroy_process_group()


def test_cpu_sync_batchnorm_equals_one_process_batchnorm():
    """2 gloo processes x 4 samples through the synced layer = torch's BatchNorm on the 8 samples
    (BatchNorm1d on (N, C) and BatchNorm2d on (N, C, H, W)); without a process group it is
    BatchNorm itself."""
    mp.spawn(_bn_worker, args=(2, _free_port()), nprocs=2, join=True)
    bn, x, _ = _bn_case((6, 5), 2)
    synced = dist.convert_sync_batchnorm(torch.nn.Sequential(bn), "cpu")[0]
    with torch.no_grad():
        ref = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
        torch.testing.assert_close(synced(x), ref)


# --------------------------------------------------------------------------- pretrain.py under torchrun

def _run(cmd, cwd):
    import subprocess
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def captions_root():
    # the built-in captioned synthetic set (its generator, 48 images instead of 600 to stay fast)
    from gissl.data.synthetic import synthetic_root
    return synthetic_root("captions", num=48)


@pytest.mark.slow
def test_slip_two_processes_equal_one_process(captions_root, tmp_path, monkeypatch):
    """SLIP (CLIP + SimCLR) on 2 gloo CPU processes trains what one process trains on the same
    global batches: the loader gives each step the same 8 images whatever the number of ranks
    (each rank every 2nd of one permutation, augmentations seeded per image), both losses gather
    the embeddings with their gradients, and the SimCLR head's BatchNorm is synchronised
    (logit_scale's clamp, called on every rank, is not reached in 4 steps; test_clip_pretrain.py
    checks it). So the epoch's mean CLIP and SimCLR losses (steps 2-4 on
    updated weights) and the final weights agree to float rounding; unsynchronised BatchNorm
    made the SimCLR term differ by 5 %. SGD at a large lr: AdamW's sign-like steps on
    zero-gradient parameters (the attention key biases) would amplify rounding noise to a whole
    lr. Rank 0 alone writes the checkpoint, holding both towers, logit_scale and the tokenizer."""
    argv = ["pretrain.py", "--ss-framework", "slip", *TINY, "--optimizer", "sgd", "--learning-rate", "0.5",
            "--data-root", captions_root]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv,
          "--output-dir", str(tmp_path / "ddp")], ROOT)
    # one process: in this one, as the script runs it (cli.run seeds as the children's did)
    import pretrain
    from gissl import cli
    monkeypatch.setattr(sys, "argv", [*argv, "--output-dir", str(tmp_path / "one")])
    cli.run(pretrain.main, pretrain.get_args)
    ddp, one = tmp_path / "ddp" / "vit_t-slip-captions", tmp_path / "one" / "vit_t-slip-captions"
    assert sorted(os.listdir(ddp)) == sorted(os.listdir(one)) == [
        "checkpoint.jsonl", "checkpoint.last.pth", "checkpoint.pth", "checkpoint.txt", "encoder.pth"]
    logs = [json.loads((d / "checkpoint.jsonl").read_text()) for d in (ddp, one)]
    for term in ("clip", "simclr"):
        assert logs[0]["train"][term] == pytest.approx(logs[1]["train"][term], rel=1e-5), term
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (ddp, one))
    assert a["model"].keys() == b["model"].keys() and a["global_step"] == b["global_step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-4, msg=k)
    keys = set(a["model"])
    assert {"image_projection", "logit_scale", "text.text_projection", "text.token_embedding.weight"} <= keys
    assert any(k.startswith("encoder.blocks.") for k in keys) and any(k.startswith("image_mlp.") for k in keys)
    assert 0 <= float(a["model"]["logit_scale"]) <= math.log(100)
    assert a["extra"]["tokenizer"] == b["extra"]["tokenizer"] and a["extra"]["tokenizer"]["kind"] == "clip-bpe"


# --------------------------------------------------------------------------- the official vocabulary

def _class_folder(root):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cecum", "pylorus", "z-line")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            a = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
            a[..., c] += 150
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def test_clip_with_official_vocabulary_then_zeroshot(captions_root, tmp_path, monkeypatch):
    """``--tokenizer`` open_clip's vocabulary file: the text tower has its 49408 tokens, the
    checkpoint's tokenizer, loaded as ``eval_transfer.py --protocol zeroshot`` loads it, gives
    open_clip's SimpleTokenizer ids (an independent implementation of OpenAI's), and zero-shot
    classification runs on the checkpoint."""
    tokenizer_mod = pytest.importorskip("open_clip.tokenizer")
    import eval_transfer
    import pretrain
    from gissl.ssl.clip import load_image_text_model
    vocab = tokenizer_mod.default_bpe()  # bpe_simple_vocab_16e6.txt.gz in open_clip's package folder
    assert os.path.basename(vocab) == "bpe_simple_vocab_16e6.txt.gz" and os.path.isfile(vocab)
    monkeypatch.chdir(tmp_path)  # eval_results.txt
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--ss-framework", "clip", *TINY, "--data-root", captions_root,
                                      "--tokenizer", vocab, "--output-dir", str(tmp_path / "pre")])
    pretrain.main(pretrain.get_args())
    ckpt = tmp_path / "pre" / "vit_t-clip-captions" / "checkpoint.pth"
    state = torch.load(ckpt, weights_only=True)
    assert state["model"]["text.token_embedding.weight"].shape == (49408, 32)

    model, tokenizer = load_image_text_model(str(ckpt))  # no --tokenizer: the checkpoint's own
    reference = tokenizer_mod.SimpleTokenizer(vocab)
    with open(os.path.join(captions_root, "captions.csv"), encoding="utf-8") as f:
        captions = [line.split(",", 1)[1].strip().strip('"') for line in f.read().splitlines()[1:6]]
    captions += ["endoscopy image of the z line", "Polyp, 5 mm; sessile (Paris 0-Is)!", "café naïve 😀", ""]
    for n in (16, 77):
        assert torch.equal(tokenizer(captions, context_length=n), reference(captions, context_length=n)), n
    assert model.text.context_length == 16

    monkeypatch.setattr(sys, "argv", [
        "eval_transfer.py", "--protocol", "zeroshot", "--architecture", "vit_t", "--pretraining", "Hyperkvasir",
        "--ss-framework", "clip", "--checkpoint", str(ckpt), "--dataset", "folder", "--data-root",
        str(_class_folder(tmp_path / "classes")), "--split", "stratified", "--image-size", "32", "--workers", "0",
        "--no-cache", "--output-dir", str(tmp_path / "eval")])
    res = eval_transfer.main(eval_transfer.get_args())
    assert 0 <= res["Top-1 accuracy"] <= 1 and res["Top-5 accuracy"] == 1.0  # 3 classes
    assert "Transfer (zeroshot) results" in (tmp_path / "eval_results.txt").read_text()
