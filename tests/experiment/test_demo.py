"""The built-in demos, in their quick form."""

import json

import pytest

from auxloss.cli import main
from auxloss.experiment.demos import DEMOS, demo_config
from auxloss.zoo.data import fashion_mnist_available


def test_demo_configs_are_valid_and_have_the_required_variants():
    for name in DEMOS:
        cfg = demo_config(name)
        assert cfg.seeds >= 5
        assert {"deep-supervision", "aux-task", "curriculum"} <= set(cfg.variant_names)
        quick = demo_config(name, quick=True)
        assert quick.seeds >= 3
    deep = demo_config("shapes").variant("deep-supervision")
    assert [t.weight for t in deep.tasks] == [0.3, 0.3]  # the GoogLeNet recipe


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("Report: ") and printed[-1].endswith("report.html")
    results = json.loads((out / "results.json").read_text())
    names = [v["name"] for v in results["variants"]]
    assert names[0] == "baseline" and {"deep-supervision", "aux-task", "curriculum"} <= set(names)
    assert all(len(v["seeds"]) == 3 for v in results["variants"])
    for c in results["comparisons"]:
        assert c["verdict"] in ("helps", "hurts", "no detectable effect")
        assert len(c["ci95"]) == 2 and 0.0 <= c["p_value"] <= 1.0
    assert (out / "report.md").exists() and any((out / "figures").glob("*.png"))


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST IDX files not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_demo_trains_on_the_real_files(tmp_path):
    from auxloss.experiment.build import build_run

    cfg = demo_config("fashion-mnist", quick=True)
    built = build_run(cfg, "aux-task", 0)
    assert built.data["train"].tensors["input"].shape[1:] == (1, 28, 28)
    assert len(built.data["train"]) == cfg.data.n_train
    batch = next(iter(built.loaders["train"]))
    report = built.objective(built.model(batch["input"]), batch)
    assert set(report.losses) == {"main", "group"}


def test_fashion_demo_without_files_says_how_to_get_them(monkeypatch, capsys):
    from auxloss.zoo import data

    monkeypatch.setattr(data, "fashion_mnist_available", lambda root=None: False)
    assert main(["demo", "fashion-mnist", "--quick"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
