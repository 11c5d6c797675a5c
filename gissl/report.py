"""Evaluation reports shared by every ``eval_*.py``: SSL4GIE's ``eval_results.txt`` lines and
its ``--print-list`` per-image lists."""
import datetime

_ARCH_IDS = {"resnet50": "RN", "vit_b": "VT", "resnet18": "RN18", "vit_s": "VTs", "vit_t": "VTt",
             "vit_l": "VTl", "vit_h": "VTh", "densenet121": "DN121", "vit_s14_dinov2": "VTsD2",
             "vit_s14_reg4_dinov2": "VTsD2R", "vit_b14_dinov2": "VTbD2", "vit_b14_reg4_dinov2": "VTbD2R",
             "vit_l14_dinov2": "VTlD2", "vit_l14_reg4_dinov2": "VTlD2R"}
_PRETRAINING_IDS = {"Hyperkvasir": "HK", "ImageNet_self": "IN", "ImageNet_class": "IN", "random": "NA"}
_FRAMEWORK_IDS = {"mocov3": "MC", "barlowtwins": "BT", "mae": "MA", "simsiam": "SS", "fpsiam": "FP"}


def list_id(architecture, pretraining, ss_framework, dataset):
    """SSL4GIE's ``--print-list`` variable name ``{A}_{D}_{F}_{dataset}`` (docs/ssl4gie-study.md §5.3):
    RN/VT for ResNet50/ViT-B (RN18, VTs, VTt for the small ones); HK/IN + MC/BT/MA for SSL,
    IN_SL for supervised ImageNet, NA_NA for random."""
    if pretraining == "ImageNet_class":
        framework = "SL"
    elif pretraining == "random":
        framework = "NA"
    else:
        framework = _FRAMEWORK_IDS.get(ss_framework, "NA")
    return f"{_ARCH_IDS.get(architecture, architecture)}_{_PRETRAINING_IDS[pretraining]}_{framework}_{dataset}"


def print_list(name, values):
    """Print per-image values as SSL4GIE's Python-list literal ``name = [...]`` (stdout only)."""
    print(f"{name} = [")
    for v in values:  # an undefined score (no polyp, none predicted) stays a valid Python literal
        print(f"    {float(v)}," if v == v else '    float("nan"),')
    print("]", flush=True)


def append_eval_results(title, name, metrics, path="eval_results.txt"):
    """Append SSL4GIE-style lines: ``{title} for {name} @ {timestamp}`` then ``Key: value``."""
    lines = [f"{title} for {name} @ {datetime.datetime.now()}"]
    lines += [f"{k}: {v}" for k, v in metrics.items()]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(path, "a") as f:
        f.write(text + "\n")
