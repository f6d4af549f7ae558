"""Models by name from the real torchvision and timm: ``auxloss layers`` and a short ``auxloss run``.

The expected shapes and parameter counts are worked out by hand from the architectures (ResNet-18's layer3:
two basic blocks 128->256 with a 1x1 projection; MobileNetV3-Small's last 1x1 conv 96->576 at stride 32;
ViT-Tiny's block: width 192, MLP 768, 16x16 patches plus a class token).
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from _real import require

from auxloss.cli import main

pytestmark = pytest.mark.integration

# name: (--size, --depth, layer, output shape, parameters of that layer)
LAYERS = {
    # 3x3 convs 128*256*9 + 256*256*9, 1x1 projection 128*256, three BatchNorms of 256 (512 parameters each),
    # then a second block of two 256*256*9 convs and two BatchNorms
    "torchvision:resnet18": (64, 1, "layer3", "Tensor(1, 256, 4, 4)", 2_099_712),
    "timm:resnet18": (64, 1, "layer3", "Tensor(1, 256, 4, 4)", 2_099_712),
    # conv 96*576 without bias + BatchNorm 2*576
    "torchvision:mobilenet_v3_small": (64, 2, "features.12", "Tensor(1, 576, 2, 2)", 56_448),
    # LayerNorms 2*2*192, qkv 192*576+576, proj 192*192+192, fc1 192*768+768, fc2 768*192+192; 14*14 patches + cls
    "timm:vit_tiny_patch16_224": (224, 2, "blocks.11", "Tensor(1, 197, 192)", 444_864),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_cli_lists_the_layers_of_a_real_model(name, capsys):
    require(name.split(":")[0])
    size, depth, layer, output, params = LAYERS[name]
    assert main(["layers", name, "--size", str(size), "--depth", str(depth)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == [layer]]
    assert output in row and row.split()[-1] == f"{params:,}"


# name: (model params, taps of the "deep" variant)
RUNS = {
    "torchvision:resnet18": ({}, {"l2": {"layer": "layer2", "head": {"type": "linear"}}}),
    "torchvision:mobilenet_v3_small": ({}, {"f6": {"layer": "features.6", "head": {"type": "mlp",
                                                                                   "params": {"hidden": [16]}}}}),
    "timm:resnet18": ({}, {"l3": {"layer": "layer3", "head": {"type": "inception_aux",
                                                              "params": {"pool_size": 1, "hidden": 32}}}}),
    # 32x32 images: timm builds the ViT for that size (2x2 patches and a class token), and the head reads the
    # class token of block 5
    "timm:vit_tiny_patch16_224": ({"img_size": 32}, {"b5": {"layer": "blocks.5",
                                                            "head": {"type": "linear", "params": {"pool": "cls"}}}}),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_auxloss_run_trains_a_real_model_with_heads_on_named_blocks(name, tmp_path, capsys):
    require(name.split(":")[0])
    from auxloss.experiment.runner import load_histories, open_experiment_store

    params, taps = RUNS[name]
    task = next(iter(taps))
    config = {
        "name": "real-" + name.replace(":", "-"),
        "seeds": 1,
        "data": {"name": "shapes", "n_train": 32, "n_val": 16, "n_test": 16, "batch_size": 16,
                 "params": {"image_size": 32}},
        "model": {"name": name, "params": params},
        "train": {"epochs": 1, "lr": 0.001, "eval_train": False},
        "variants": [{"name": "deep", "taps": taps, "tasks": [{"name": task, "source": task, "weight": 0.3}]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--workers", "1", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == ["baseline", "deep"]
    assert all(math.isfinite(v["mean"]) for v in results["variants"])
    histories, _ = load_histories(open_experiment_store(out, config["name"]))
    (epoch,) = histories["deep"][0]
    # the head on the named block was trained: its loss was computed and weighted at 0.3
    assert epoch[f"train/weight/{task}"] == 0.3 and math.isfinite(epoch[f"train/loss/{task}"])
    assert epoch[f"train/loss/{task}"] > 0
    (baseline_epoch,) = histories["baseline"][0]
    assert f"train/loss/{task}" not in baseline_epoch
