import pytest

from gissl import cli
from gissl.report import append_eval_results
from gissl.errors import UserError


def parse(argv, stage="train"):
    p = cli.task_parser("segmentation", "test", stage=stage, datasets=["Kvasir", "CVC"],
                        default_image_size=224)
    return cli.check_args(p.parse_args(argv))


def test_reference_flags_and_name():
    a = parse(["--architecture", "vit_b", "--pretraining", "random", "--dataset", "Kvasir",
               "--learning-rate-scheduler", "--accum_iter", "2", "--batch-size", "48"])
    assert (a.arch, a.accum_iter, a.batch_size, a.learning_rate) == ("vit_b", 2, 48, 1e-4)
    assert cli.run_name(a) == "vit_b-random_init-frozen_False-dataset_Kvasir"
    assert str(cli.output_dir(a)) == "Trained models/segmentation"
    assert parse(["--accum-iter", "3"]).accum_iter == 3


def test_ssl_name(tmp_path):
    ck = tmp_path / "mae.pth"
    ck.write_bytes(b"x")
    a = parse(["--architecture", "vit_b", "--pretraining", "Hyperkvasir", "--ss-framework", "mae",
               "--checkpoint", str(ck), "--frozen"])
    assert cli.run_name(a) == "vit_b-Hyperkvasir_mae_init-frozen_True-dataset_Kvasir"


@pytest.mark.parametrize("argv,match", [
    (["--pretraining", "Hyperkvasir", "--ss-framework", "mocov3"], "needs --checkpoint"),
    (["--pretraining", "Hyperkvasir", "--checkpoint", "x.pth"], "needs --ss-framework"),
    (["--architecture", "resnet50", "--ss-framework", "mae"], "does not apply"),
    (["--architecture", "vit_b", "--ss-framework", "barlowtwins"], "does not apply"),
    (["--image-size", "100"], "multiple of 32"),
    (["--checkpoint", "/nonexistent.pth"], "does not exist"),
])
def test_invalid_combinations(argv, match):
    with pytest.raises(UserError, match=match):
        parse(argv)


def test_idx_parsing():
    assert cli.positions(parse(["--idx", "11,468"], stage="predict")) == [11, 468]
    with pytest.raises(UserError, match="comma-separated"):
        parse(["--idx", "a,b"], stage="predict")


def test_eval_results_format(tmp_path):
    path = tmp_path / "eval_results.txt"
    append_eval_results("Segmentation results", "x", {"Dice": 0.5, "IoU": 0.25}, path=path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("Segmentation results for x @ ")
    assert lines[1:] == ["Dice: 0.5", "IoU: 0.25"]


def test_run_exits_2_on_user_error(capsys):
    def bad(_):
        raise UserError("what was wrong; what to do")
    with pytest.raises(SystemExit) as e:
        cli.run(bad, lambda: None)
    assert e.value.code == 2
    assert "error: what was wrong; what to do" in capsys.readouterr().err
