"""Keeping what was trained: ``keep`` (none, best, all) from Python, YAML and ``--keep``, the files it leaves, the
report's links to them, and a changed ``keep`` resuming the same experiment."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import typing
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from _user_model import Net, make_model
from torch.utils.data import TensorDataset

import auxloss as al
from auxloss.cli import KEEP_CHOICES, main
from auxloss.experiment.build import experiment_from_config
from auxloss.experiment.config import ExperimentConfig, config_hash, load_config, parse_config

TRAIN = {"epochs": 3, "lr": 1e-2, "device": "cpu", "eval_train": False}

TINY_YAML = """
name: keep-tiny
seeds: 2
data: {name: shapes, n_train: 48, n_val: 32, n_test: 32, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 1, lr: 0.01}
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
"""


def make_data(seed: int) -> dict[str, TensorDataset]:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(120, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return {"train": TensorDataset(x[:80], y[:80]), "val": TensorDataset(x[80:100], y[80:100]),
            "test": TensorDataset(x[100:], y[100:])}


def deep() -> al.Variant:
    return al.Variant("deep", taps={"mid": al.Tap("body.1", al.LinearHead(3))},
                      tasks=[al.Task("mid", source="mid", weight=0.3)])


def accuracy(state: dict[str, torch.Tensor], split: TensorDataset) -> float:
    net = Net()
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        return (net(split.tensors[0]).argmax(1) == split.tensors[1]).float().mean().item()


def report_links(folder: Path) -> tuple[list[str], list[str]]:
    """The weight files the Markdown and the HTML report link to, relative to the report's folder."""
    md = (folder / "report.md").read_text(encoding="utf-8").split("## Trained weights", 1)[1]
    page = (folder / "report.html").read_text(encoding="utf-8").split("Trained weights</h2>", 1)[1]
    return [unquote(m) for m in re.findall(r"\]\(([^)]+\.pt)\)", md)], \
        [unquote(m) for m in re.findall(r'<a href="([^"]+\.pt)">', page)]


def test_best_weights_are_linked_from_the_report_and_load_strictly(tmp_path: Path) -> None:
    out = tmp_path / "o"
    res = al.compare(model=make_model, data=make_data, variants=[deep()], seeds=2, out=out, train=TRAIN,
                     batch_size=16)
    assert res["keep"] == "best"
    md_links, html_links = report_links(out)
    expected = sorted(p for v in res["variants"] for s in ("0", "1") for p in v["weights"][s].values())
    assert sorted(md_links) == sorted(html_links) == expected and len(expected) == 6  # 2 trunks + 2*2 (deep)
    for link in md_links:
        assert (out / link).is_file()
    # The same report still points to the files after the folder moved.
    moved = tmp_path / "elsewhere" / "o"
    shutil.move(str(out), moved)
    for variant in res["variants"]:
        for seed in ("0", "1"):
            trunk = torch.load(moved / variant["weights"][seed]["trunk"], weights_only=True)
            # Into a fresh instance of the user's class, strictly; the weights are the evaluated ones.
            assert accuracy(trunk, make_data(int(seed))["test"]) == pytest.approx(
                variant["main"][variant["seeds"].index(int(seed))], abs=1e-6)
    assert all((moved / link).is_file() for link in report_links(moved)[0])


def test_keep_all_keeps_the_last_epoch_also_when_stopping_early(tmp_path: Path) -> None:
    res = al.compare(model=make_model, data=make_data, variants=[deep()], seeds=1, out=tmp_path / "all",
                     train=TRAIN, batch_size=16, keep="all")
    history = {(r["variant"], r["seed"]): r for r in _done_runs(tmp_path / "all")}
    for variant in res["variants"]:
        paths = variant["weights"]["0"]
        assert {"trunk", "last_trunk"} <= set(paths)
        last_val = history[(variant["name"], 0)]["history"][-1]["val/metric/main"]
        # The last epoch's trunk gives the last epoch's validation accuracy, recomputed here from the file.
        last = torch.load(tmp_path / "all" / paths["last_trunk"], weights_only=True)
        assert accuracy(last, make_data(0)["val"]) == pytest.approx(last_val, abs=1e-6)
    assert {"last_trunk", "last_heads"} <= set(res["variants"][1]["weights"]["0"])
    assert set(report_links(tmp_path / "all")[0]) == {p for v in res["variants"] for p in v["weights"]["0"].values()}
    # An lr too small to move float32 weights: no epoch beats the first, patience 1 stops at epoch 2 of 5.
    still = al.compare(model=make_model, data=make_data, variants=[], seeds=1, out=tmp_path / "stop", keep="all",
                       train={**TRAIN, "epochs": 5, "lr": 1e-30, "patience": 1}, batch_size=16)
    (run,) = _done_runs(tmp_path / "stop")
    assert run["result"]["stopped_early"] and len(run["history"]) == 2
    assert (tmp_path / "stop" / still["variants"][0]["weights"]["0"]["last_trunk"]).is_file()


def test_keep_none_keeps_nothing_and_the_report_says_how_to_keep(tmp_path: Path) -> None:
    res = al.compare(model=make_model, data=make_data, variants=[deep()], seeds=1, out=tmp_path / "o",
                     train=TRAIN, batch_size=16, keep="none")
    assert res["keep"] == "none" and all(v["weights"] == {} for v in res["variants"])
    assert not list((tmp_path / "o" / "runs").rglob("*.pt"))
    md = (tmp_path / "o" / "report.md").read_text(encoding="utf-8")
    section = md.split("## Trained weights", 1)[1].split("\n## ", 1)[0]
    assert "No trained weights were kept (keep: none)" in section and "--keep best" in section


def test_keep_is_not_part_of_the_fingerprint() -> None:
    cfg = load_config_text(TINY_YAML)
    # The hash before keep left it, for a config with the default keep: folders written then still match.
    data = cfg.model_dump(mode="json")
    data.pop("seeds")
    data["train"].pop("engine")
    data["train"].pop("lightning")
    legacy = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    hashes = {keep: config_hash(cfg.model_copy(update={"keep": keep})) for keep in KEEP_CHOICES}
    assert set(hashes.values()) == {legacy}
    assert KEEP_CHOICES == typing.get_args(ExperimentConfig.model_fields["keep"].annotation)


def load_config_text(text: str) -> ExperimentConfig:
    import yaml

    return parse_config(yaml.safe_load(text), source="test")


def test_cli_keep_overrides_the_config_and_resumes_the_same_folder(tmp_path: Path, capsys) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(TINY_YAML)
    out = tmp_path / "out"
    assert main(["run", str(cfg_path), "--out", str(out), "--workers", "1", "--keep", "none"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["keep"] == "none" and not list(out.rglob("*.pt"))
    assert load_config(out / "config.yaml").keep == "none"
    # Another keep is the same experiment: nothing is trained again (finished runs keep what they kept), no error.
    before = _done_runs(out)
    assert main(["run", str(cfg_path), "--out", str(out), "--workers", "1", "--keep", "best", "--seeds", "3"]) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["keep"] == "best" and load_config(out / "config.yaml").keep == "best"
    runs = {(r["variant"], r["seed"]): r for r in _done_runs(out)}
    assert all(runs[(r["variant"], r["seed"])]["result"] == r["result"] for r in before)
    # Only the seed trained with keep: best has weights; the report lists the others as not kept.
    assert {v["name"]: sorted(v["weights"]) for v in results["variants"]} == {"baseline": ["2"], "deep": ["2"]}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "seed 0: no weights kept" in md and "seed 2: best trunk" in md
    # The trunk loads strictly into a fresh model built as for the runs (the config's model and params).
    fresh = experiment_from_config(load_config(cfg_path)).model(2)
    trunk_path = out / results["variants"][1]["weights"]["2"]["trunk"]
    fresh.load_state_dict(torch.load(trunk_path, weights_only=True), strict=True)
    heads = torch.load(out / results["variants"][1]["weights"]["2"]["heads"], weights_only=True)
    assert heads and all(k.startswith("aux1.") for k in heads)
    # A report written to another folder links back to the weights in the output folder.
    assert main(["report", str(out), "--out", str(tmp_path / "copy")]) == 0
    links = report_links(tmp_path / "copy")[0]
    assert links and all(link.startswith("../out/") and (tmp_path / "copy" / link).is_file() for link in links)


def test_cli_rejects_an_unknown_keep(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(tmp_path / "c.yaml"), "--keep", "last"])
    assert exit_.value.code == 2 and "invalid choice: 'last'" in capsys.readouterr().err


def _done_runs(out: Path) -> list[dict]:
    from auxloss.experiment.store import Store

    store = Store(out / "results.sqlite", stale_after=1.0, readonly=True)
    return store.runs("done")


TRINH_YAML = """
name: trb
seeds: 1
data: {name: digits-sequence, n_train: 32, n_val: 16, n_test: 16, batch_size: 16}
model: {name: lstm_classifier, params: {hidden: 8}}
train: {epochs: 1, lr: 0.01, eval_train: false, device: cpu}
variants:
  - name: trinh
    taps: {t: {layer: rnn, head: {type: trinh, params: {segment: 4}}}}
    tasks: [{name: t, source: t, weight: 0.5}]
"""


@pytest.mark.parametrize("keep", ["best", "all"])
def test_a_trinh_head_with_extra_state_is_kept_and_loads_back(tmp_path: Path, keep: str) -> None:
    """Audit 2 row 45: the Trinh head's state dict holds ``_extra_state`` (a dict with its generator's state), which
    the keeper once called ``.detach()`` on, losing every Trinh run."""
    from auxloss.experiment.assemble import build_run

    cfg_path = tmp_path / "trb.yaml"
    cfg_path.write_text(TRINH_YAML)
    out = tmp_path / "trb"
    assert main(["run", str(cfg_path), "--out", str(out), "--workers", "1", "--keep", keep]) == 0
    results = json.loads((out / "results.json").read_text())
    files = results["variants"][1]["weights"]["0"]
    assert {"trunk", "heads"} <= set(files) and (keep == "best") == ("last_heads" not in files)
    exp = experiment_from_config(load_config(cfg_path))
    for part in ("heads", "last_heads") if keep == "all" else ("heads",):
        saved = torch.load(out / files[part], weights_only=True)
        assert isinstance(saved["t._extra_state"], dict) and saved["t._extra_state"]["seed"] is not None
        heads = build_run(exp, "trinh", 0, device="cpu").model.heads
        heads.load_state_dict(saved, strict=True)
        back = heads.state_dict()
        for key, value in saved.items():
            if key.endswith("_extra_state"):
                assert back[key]["seed"] == value["seed"]
                assert torch.equal(back[key]["generator"], value["generator"])
            else:
                assert torch.equal(back[key], value), key
    fresh = exp.model(0)
    fresh.load_state_dict(torch.load(out / files["trunk"], weights_only=True), strict=True)


def test_a_state_torch_cannot_read_back_is_a_clear_error(tmp_path: Path) -> None:
    from auxloss.errors import AuxLossError
    from auxloss.experiment.worker import _save_tensors

    with pytest.raises(AuxLossError, match=r"'h._extra_state.fn' holds a builtin_function_or_method.*keep: none"):
        _save_tensors({"h.w": torch.ones(2), "h._extra_state": {"fn": len}}, tmp_path / "x.pt")
