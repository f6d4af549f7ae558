import json

import pytest
import torch
from torch import nn

import auxloss as al
from auxloss.experiment.config import parse_config
from auxloss.experiment.probe import _lookahead, _summarise, agreement, run_probe


def test_lookahead_affinity_is_tags_formula():
    # Z = 1 - L_main(θ - η g_aux) / L_main(θ), on the shared parameters only, computed here by hand.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model = al.attach(net, {"aux": al.Tap("1", al.LinearHead(2))}, example_input=torch.randn(1, 4))
    objective = al.Objective(aux=[al.Task("aux", source="aux", target="t2")])
    x = torch.randn(16, 4)
    batch = {"input": x, "target": torch.randint(0, 3, (16,)), "t2": torch.randint(0, 2, (16,))}
    report = objective(model(x), batch)
    shared = [("model.0.weight", net[0].weight), ("model.0.bias", net[0].bias)]
    grads = torch.autograd.grad(report.losses["aux"], [p for _, p in shared])
    z = _lookahead(model, objective, batch, x, shared, grads, 0.5, float(report.losses["main"]))
    with torch.no_grad():
        before = nn.functional.cross_entropy(net(x), batch["target"])
        w, b = net[0].weight.clone(), net[0].bias.clone()
        net[0].weight -= 0.5 * grads[0]
        net[0].bias -= 0.5 * grads[1]
        after = nn.functional.cross_entropy(net(x), batch["target"])
        net[0].weight.copy_(w), net[0].bias.copy_(b)
    assert z == pytest.approx(1 - float(after) / float(before), rel=1e-5)


def test_learnability_labels():
    flat = [2.0] * 50
    assert _summarise([0.1], [0.0], flat, flat, bounded_accuracy=False)["learning"] == "too hard"
    falling = [2.0 - 0.03 * i for i in range(50)]
    assert _summarise([0.1], [0.0], falling, [1.5] * 50, bounded_accuracy=False)["learning"] == "learnable"
    assert _summarise([0.1], [0.0], falling, [0.99] * 50)["learning"] == "too easy"


def test_probe_ranks_candidates_and_compares_with_a_finished_experiment(tmp_path):
    cfg = parse_config({
        "name": "probe-t",
        "data": {"name": "shapes", "n_train": 64, "n_val": 32, "n_test": 32, "batch_size": 32,
                 "params": {"image_size": 16}},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "variants": [
            {"name": f"v{i}", "taps": {"c": {"layer": "block2", "head": {"type": "linear"}}},
             "tasks": [{"name": "c", "source": "c", "target": t}]}
            for i, t in enumerate(["colour", "size", "position"])
        ],
    })
    (tmp_path / "results.json").write_text(json.dumps({
        "higher_is_better": True,
        "comparisons": [{"variant": "v0", "delta": 0.03}, {"variant": "v1", "delta": 0.01},
                        {"variant": "v2", "delta": -0.02}]}))
    summary = run_probe(cfg, tmp_path, steps=6, every=3)
    assert [c["rank"] for c in summary["candidates"]] == [1, 2, 3]
    scores = [c["score"] for c in summary["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert summary["agreement"]["spearman_rho"] is not None
    assert (tmp_path / "probe.md").read_text().startswith("# Probe: probe-t")
    ag = agreement([{"variant": "a", "score": 3.0}, {"variant": "b", "score": 2.0}, {"variant": "c", "score": 1.0}],
                   {"comparisons": [{"variant": "a", "delta": 0.3}, {"variant": "b", "delta": 0.2},
                                    {"variant": "c", "delta": 0.1}]})
    assert ag["spearman_rho"] == pytest.approx(1.0)
