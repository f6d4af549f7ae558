import json
import sqlite3

import pytest
import torch

from auxloss import AuxLossError
from auxloss.experiment.build import build_run
from auxloss.experiment.config import load_config, parse_config
from auxloss.experiment.runner import load_histories, run_experiment
from auxloss.experiment.store import Store

TINY = {
    "name": "tiny",
    "seeds": 2,
    "data": {"name": "shapes", "n_train": 48, "n_val": 32, "n_test": 32, "batch_size": 16,
             "params": {"image_size": 16}},
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "train": {"epochs": 2, "lr": 0.01},
    "variants": [
        {"name": "deep", "taps": {"aux1": {"layer": "block1", "head": {"type": "linear"}}},
         "tasks": [{"name": "aux1", "source": "aux1", "weight": 0.3}]},
        {"name": "colour", "taps": {"c": {"layer": "block2", "head": {"type": "mlp", "params": {"hidden": [8]}}}},
         "tasks": [{"name": "colour", "source": "c", "target": "colour",
                    "weight": {"type": "curriculum", "value": 0.5, "start": 2, "ramp": 2}}]},
    ],
}


def test_seed_gives_every_variant_the_same_data_trunk_init_and_batch_order():
    cfg = parse_config(TINY)
    for variant in ("deep", "colour"):
        base = build_run(cfg, "baseline", 1)
        rng_base = torch.random.get_rng_state()
        other = build_run(cfg, variant, 1)
        # the global RNG (dropout) starts from the same state in every variant
        assert torch.equal(torch.random.get_rng_state(), rng_base)
        trunk = other.model.model  # the AuxModel's untouched user model
        assert base.model.state_dict().keys() == trunk.state_dict().keys()
        for k, v in base.model.state_dict().items():
            assert torch.equal(v, trunk.state_dict()[k]), k
        for split in ("train", "val", "test"):
            assert torch.equal(base.data[split].tensors["input"], other.data[split].tensors["input"])
        # (each loader is iterated once here, as in training: its generator moves on every epoch)
        for b1, b2 in zip(base.loaders["train"], other.loaders["train"]):
            assert torch.equal(b1["input"], b2["input"]) and torch.equal(b1["target"], b2["target"])
    # a different seed gives a different initialisation and a different batch order
    seed2 = build_run(cfg, "baseline", 0)
    w = "block1.conv1.weight"
    assert not torch.equal(base.model.state_dict()[w], seed2.model.state_dict()[w])


def test_config_errors_name_the_key_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nseeds: 2\ntrain:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(AuxLossError) as err:
        load_config(path)
    assert f"{path}:5" in str(err.value) and "train.learning_rate" in str(err.value)
    path.write_text("name: x\nseeds: two\n")
    with pytest.raises(AuxLossError, match=r"c.yaml:2: seeds: .*integer.*'two'"):
        load_config(path)
    path.write_text("name: x\ntrain: [1, 2\n")
    with pytest.raises(AuxLossError, match=r"c.yaml:3: YAML syntax error"):
        load_config(path)
    with pytest.raises(AuxLossError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(AuxLossError, match=r"task 'a' reads source 'nope'"):
        parse_config({"variants": [{"name": "v", "tasks": [{"name": "a", "source": "nope"}]}]})
    with pytest.raises(AuxLossError, match="duplicate variant names"):
        parse_config({"variants": [{"name": "v"}, {"name": "v"}]})
    with pytest.raises(AuxLossError, match="did you mean 'epochs'"):
        parse_config({"train": {"epoch": 3}})


MERGED = """name: merged
seeds: 1
data: {name: shapes, n_train: 48, n_val: 32, n_test: 32, batch_size: 16, params: {image_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: &t {epochs: 2, lr: 0.01}
variants:
  - name: deep
    taps: {aux1: {layer: block1, head: {type: linear}}}
    tasks: [{name: aux1, source: aux1, weight: 0.3}]
    train: {<<: *t, lr: 0.02}
"""


def test_yaml_merge_keys_may_be_overridden_but_real_duplicates_are_refused(tmp_path):
    """Audit 2 row 28: `train: {<<: *t, lr: 0.02}` is YAML's merge with an override, not a duplicate key."""
    path = tmp_path / "c.yaml"
    path.write_text(MERGED)
    cfg = load_config(path)
    assert cfg.train.lr == 0.01 and cfg.variants[0].train == {"epochs": 2, "lr": 0.02}
    # The same in block style.
    path.write_text(MERGED.replace("train: &t {epochs: 2, lr: 0.01}", "train: &t\n  epochs: 2\n  lr: 0.01")
                    .replace("train: {<<: *t, lr: 0.02}", "train:\n      <<: *t\n      lr: 0.02"))
    assert load_config(path).variants[0].train == {"epochs": 2, "lr": 0.02}
    # The same key twice at one level is still refused, with both lines; also next to a merge.
    path.write_text(MERGED.replace("train: {<<: *t, lr: 0.02}", "train:\n      <<: *t\n      lr: 0.02\n"
                                   "      lr: 0.03"))
    with pytest.raises(AuxLossError, match=r"c\.yaml:13: duplicate key 'lr' at the same level: first on line 12, "
                                           r"again on line 13"):
        load_config(path)
    path.write_text(MERGED + "train: {epochs: 1}\n")
    with pytest.raises(AuxLossError, match=r"c\.yaml:11: duplicate key 'train' at the same level: first on line 5, "
                                           r"again on line 11"):
        load_config(path)


def test_run_writes_results_resumes_and_refuses_another_experiment(tmp_path):
    cfg = parse_config(TINY)
    results = run_experiment(cfg, tmp_path, workers=1)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["metric"] == "accuracy" and on_disk["higher_is_better"] is True
    assert on_disk["baseline"] == "baseline"
    names = [v["name"] for v in on_disk["variants"]]
    assert names == ["baseline", "deep", "colour"]
    for v in on_disk["variants"]:
        assert v["seeds"] == [0, 1] and len(v["main"]) == 2
        assert v["mean"] == pytest.approx(sum(v["main"]) / 2)
    assert [c["variant"] for c in on_disk["comparisons"]] == ["deep", "colour"]
    for c in on_disk["comparisons"]:
        assert set(c) >= {"variant", "delta", "ci95", "p_value", "verdict"}
    for f in ("report.html", "report.md", "config.yaml"):
        assert (tmp_path / f).exists()
    assert results["runs"] == {"done": 6, "failed": 0, "pending": 0}
    # results.json names the main task, and that name is the one its history keys use (the report reads them).
    histories, _ = load_histories(Store(tmp_path / "results.sqlite"))
    records = [rec for runs in histories.values() for recs in runs.values() for rec in recs]
    assert len(records) == 6 * 2  # 6 runs of 2 epochs
    assert all(f"val/metric/{on_disk['main_task']}" in rec for rec in records)

    # Interrupt one run (as a kill would leave it) and run again: only that run is redone.
    db = tmp_path / "results.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE runs SET status='running', result=NULL WHERE variant='deep' AND seed=1")
        before = dict(con.execute("SELECT variant || seed, finished FROM runs").fetchall())
    run_experiment(cfg, tmp_path, workers=1)
    with sqlite3.connect(db) as con:
        after = dict(con.execute("SELECT variant || seed, finished FROM runs").fetchall())
        attempts = dict(con.execute("SELECT variant || seed, attempts FROM runs").fetchall())
    assert after["deep1"] != before["deep1"] and attempts["deep1"] == 2
    assert all(after[k] == before[k] for k in after if k != "deep1")

    other = parse_config({**TINY, "name": "other", "train": {"epochs": 1}})
    with pytest.raises(AuxLossError, match="another experiment"):
        run_experiment(other, tmp_path)


def test_store_claims_each_run_once(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.add_runs([("a", 0), ("b", 0)])
    first, second = store.claim("w1"), store.claim("w2")
    assert {first, second} == {("a", 0), ("b", 0)} and store.claim("w3") is None
    assert store.finish("a", 0, {"main": 1.0}, [], worker="w1")
    assert not store.finish("a", 0, {"main": 2.0}, [], worker="w2")  # finished already: never overwritten
    assert store.runs("done")[0]["result"] == {"main": 1.0}


def test_store_in_a_non_database_file_is_named(tmp_path):
    bad = tmp_path / "results.sqlite"
    bad.write_text("not a database" * 100)
    with pytest.raises(AuxLossError, match=r"is not an auxloss results store \(file is not a database\)"):
        Store(bad)
