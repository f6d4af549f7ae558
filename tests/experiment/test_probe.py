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


def test_lookahead_with_a_truncated_trinh_task_scores_the_main_loss_only():
    # The crash on the sequences demo: the look-ahead scored every task on outputs made with the shifted weights,
    # and the truncated Trinh loss, which recomputes the RNN with its module's own (unshifted) weights, refused
    # the mismatch. The look-ahead now scores the main loss alone, computed here by hand.
    from auxloss.sequence import trinh_auxiliary
    from auxloss.zoo.models import LSTMClassifier

    torch.manual_seed(0)
    net = LSTMClassifier(1, 3, hidden=8)
    taps, tasks = trinh_auxiliary(net, "rnn", segment=4, truncate=4, weight=1.0)
    model = al.attach(net, taps, example_input=torch.zeros(1, 12, 1))
    objective = al.Objective(aux=tasks)
    x = torch.randn(6, 12, 1)
    batch = {"input": x, "target": torch.randint(0, 3, (6,))}
    report = objective(model(x), batch)
    shared = [(n, p) for n, p in model.named_parameters() if n.startswith("model.rnn")]
    grads = torch.autograd.grad(report.losses["trinh"], [p for _, p in shared])
    z = _lookahead(model, objective, batch, x, shared, grads, 0.5, float(report.losses["main"]))
    with torch.no_grad():
        net.eval()
        before = nn.functional.cross_entropy(net(x), batch["target"])
        saved = [p.clone() for _, p in shared]
        for (_, p), g in zip(shared, grads):
            p -= 0.5 * g
        after = nn.functional.cross_entropy(net(x), batch["target"])
        for (_, p), v in zip(shared, saved):
            p.copy_(v)
    assert z == pytest.approx(1 - float(after) / float(before), rel=1e-5)


def test_probe_runs_on_every_demo_config(tmp_path, monkeypatch):
    # A few steps of every candidate of every demo (the demo configs themselves, shrunk), including the sequences
    # demo's truncated Trinh task that used to crash the look-ahead.
    from auxloss.experiment.demos import DEMOS, demo_config
    from auxloss.zoo.data.idx import fashion_mnist_available

    for name in DEMOS:
        if name == "fashion-mnist" and not fashion_mnist_available():
            continue
        cfg = demo_config(name, quick=True)
        cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 64, 32, 32
        summary = run_probe(cfg, tmp_path / name, steps=2, every=1)
        assert len(summary["candidates"]) == len(cfg.variants)
        assert all(c["steps"] == 2 and c["measurements"] == 2 for c in summary["candidates"])


def _budget_cfg(n_train: int, epochs: int, seeds: int = 3):
    return parse_config({
        "name": "budget-t", "seeds": seeds,
        "data": {"name": "shapes", "n_train": n_train, "n_val": 32, "n_test": 32, "batch_size": 32,
                 "params": {"image_size": 16}},
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "train": {"epochs": epochs},
        "variants": [
            {"name": "one", "taps": {"c": {"layer": "block2", "head": {"type": "linear"}}},
             "tasks": [{"name": "c", "source": "c", "target": "colour"}]},
            {"name": "two", "taps": {"c": {"layer": "block2", "head": {"type": "linear"}},
                                     "s": {"layer": "block1", "head": {"type": "linear"}}},
             "tasks": [{"name": "c", "source": "c", "target": "colour"}, {"name": "s", "source": "s",
                                                                          "target": "size"}]},
        ],
    })


def test_the_plan_keeps_the_probe_within_its_budget():
    from auxloss.experiment.probe import experiment_steps, plan_probe, run_steps

    cfg = _budget_cfg(n_train=640, epochs=10)
    # 640 / 32 = 20 steps an epoch, 10 epochs, 3 seeds, 2 variants + the baseline
    assert run_steps(cfg) == 200 and experiment_steps(cfg) == 200 * 3 * 3 == 1800
    plan = plan_probe(cfg)
    # budget 0.2 * 1800 = 360 step-equivalents. Five measurements cost 2 steps per auxiliary task: 5*2*1 + 5*2*2 =
    # 30, within a tenth of the budget (36). Each evaluation of the 32 validation samples costs
    # ceil(32 / (3 * 32)) = 1 step: 3 readings per run and the baseline's read at step 0 make 10. So
    # (360 - 10 - 30) // 3 = 106 steps per run, measured every ceil(106 / 5) = 22 steps.
    assert (plan["steps"], plan["every"]) == (106, 22)
    assert plan["probe_steps"] == 3 * 106 + 10 + 5 * 2 + 5 * 4 == 358
    assert plan["cost_fraction"] == pytest.approx(358 / 1800) and not plan["over_budget"]
    whole = plan_probe(_budget_cfg(n_train=640, epochs=10), budget=1.0)
    assert whole["steps"] == 200  # never longer than one run of the experiment (200 steps)
    # 72: five measurements (30) would take more than a tenth; with three (18), 14 steps cost 42 + 10 + 18 = 70 and
    # 15 would cost 45 + 10 + 18 = 73
    tight = plan_probe(cfg, budget=0.04)
    assert (tight["steps"], tight["every"]) == (14, 5) and tight["probe_steps"] == 42 + 10 + 3 * 2 + 3 * 4 <= 72
    tiny = plan_probe(_budget_cfg(n_train=64, epochs=2, seeds=1))  # 2·2·1·3 = 12 steps in all: nothing fits
    assert tiny["steps"] == 4 and tiny["over_budget"]  # a whole run (4 steps), the most a race can use
    # Runs of 4 steps with 30 seeds: 360 steps, budget 72. The whole run fits: 3 runs x 4 steps, 10 evaluations,
    # and 2 measurements per candidate (every ceil(4 / 3) = 2 steps); a run shorter than 10 steps is no overrun.
    short = plan_probe(_budget_cfg(n_train=64, epochs=2, seeds=30))
    assert short["steps"] == 4 and not short["over_budget"] and short["probe_steps"] == 12 + 10 + 2 * 2 + 2 * 4
    with pytest.raises(al.AuxLossError, match="budget must be"):
        plan_probe(cfg, budget=1.5)


def test_the_probe_counts_its_own_steps(tmp_path):
    cfg = _budget_cfg(n_train=640, epochs=2)  # 20 · 2 · 3 · 3 = 360 steps; budget 72
    summary = run_probe(cfg, tmp_path)
    # 14 steps per run (see the plan's test), 3 measurements every 5 steps
    assert [(c["steps"], c["measurements"]) for c in summary["candidates"]] == [(14, 3), (14, 3)]
    base = summary["baseline"]
    assert base["steps"] == 14 and [v["step"] for v in base["validation"]] == [7, 11, 14]
    assert base["start"]["step"] == 0
    counted = 14 + 4 + sum(c["steps"] + c["measurements"] * 2 * len(c["tasks"]) + 3 for c in summary["candidates"])
    assert summary["probe_steps"] == counted == 70
    assert summary["cost_fraction"] == pytest.approx(70 / 360)
    assert "of the full experiment's training steps" in (tmp_path / "probe.md").read_text()


def test_a_race_too_short_to_move_the_baseline_says_so(tmp_path):
    # A 2-layer MLP on digits learns fast: one step barely moves its held-out loss (0.6% here), 30 steps move it
    # about 28%. Deterministic on CPU (fixed seed, one process), far from the 10% line either way.
    cfg = parse_config({
        "name": "digits-probe", "seeds": 1,
        "data": {"name": "digits", "n_train": 256, "n_val": 128, "n_test": 64, "batch_size": 32,
                 "params": {"flatten": True}},
        "model": {"name": "deep_mlp", "params": {"hidden": 32, "depth": 2}},
        "train": {"epochs": 4, "lr": 0.003, "optimizer": "adam", "eval_train": False},
        "variants": [{"name": "ds", "taps": {"a": {"layer": "layers.0", "head": {"type": "linear"}}},
                      "tasks": [{"name": "a", "source": "a", "weight": 0.3}]}]})
    short = run_probe(cfg, tmp_path / "short", steps=1, every=1)
    assert short["too_short"] and short["baseline_progress"] < 0.05
    assert "Early in training" in (tmp_path / "short" / "probe.md").read_text()
    longer = run_probe(cfg, tmp_path / "longer", steps=30, every=10)
    assert longer["baseline_progress"] > 0.2 and not longer["too_short"]
    text = (tmp_path / "longer" / "probe.md").read_text()
    assert "Early in training" not in text and "the baseline's held-out main loss went from" in text


def test_race_is_the_mean_relative_loss_fall_and_the_signed_metric_change():
    from auxloss.experiment.probe import race

    base = [{"step": 5, "loss": 2.0, "metric": 0.50}, {"step": 8, "loss": 1.0, "metric": 0.60}]
    cand = [{"step": 5, "loss": 1.5, "metric": 0.55}, {"step": 8, "loss": 1.2, "metric": 0.58}]
    r = race(base, cand)
    assert r["loss_gain"] == pytest.approx(((2.0 - 1.5) / 2.0 + (1.0 - 1.2) / 1.0) / 2)  # (0.25 - 0.2) / 2
    assert r["metric_delta"] == pytest.approx(((0.55 - 0.50) + (0.58 - 0.60)) / 2)
    lower = race(base, cand, higher_is_better=False)  # an error metric: a rise is worse
    assert lower["metric_delta"] == pytest.approx(-r["metric_delta"])
    no_metric = race([{**b, "metric": None} for b in base], [{**c, "metric": None} for c in cand])
    assert no_metric["metric_delta"] is None and no_metric["loss_gain"] == pytest.approx(r["loss_gain"])
    with pytest.raises(al.AuxLossError, match="same steps"):
        race(base, cand[:1])


ZERO_WEIGHT_VARIANT = {"name": "off", "tasks": [{"name": "c", "source": "c", "target": "target", "weight": 0.0}]}


@pytest.mark.parametrize(("dropout", "weighting"), [(0.0, None), (0.5, None), (0.5, "main_progress")])
def test_a_candidate_at_weight_zero_ties_the_baseline_exactly(tmp_path, monkeypatch, dropout, weighting):
    # The race is paired: same weights, same batches, same optimizer, same random stream. A task at weight 0 adds
    # exact zeros to the gradient, so its run is the baseline's, step for step, and the race must say so to the last
    # bit. With dropout this holds only if the race's own readings (the baseline's extra one at step 0, each
    # evaluation's loader seed) leave the training's random stream alone, and so must the Trainer's evaluations at
    # epoch ends, which main_progress's run makes (it reads their metrics) and the baseline's does not.
    (tmp_path / "probe_dropnet.py").write_text(
        "from torch import nn\n\n\n"
        "def build(dropout):\n"
        "    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 32), nn.ReLU(),\n"
        "                         nn.Dropout(dropout), nn.Linear(32, 10))\n")
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({
        "name": "probe-zero", "seeds": 1,
        "data": {"name": "digits", "n_train": 128, "n_val": 64, "n_test": 32, "batch_size": 32,
                 "params": {"flatten": True}},
        "model": {"name": "probe_dropnet:build", "params": {"dropout": dropout}},
        "train": {"epochs": 3, "lr": 0.01, "optimizer": "adam", "eval_train": False},
        "variants": [{**ZERO_WEIGHT_VARIANT, "taps": {"c": {"layer": "1", "head": {"type": "linear"}}},
                      **({"weighting": {"type": weighting}} if weighting else {})}],
    })
    summary = run_probe(cfg, tmp_path / "out", steps=8, every=4)
    (off,) = summary["candidates"]
    assert [v["step"] for v in off["validation"]] == [4, 6, 8]
    assert [v["loss"] for v in off["validation"]] == [v["loss"] for v in summary["baseline"]["validation"]]
    assert off["loss_gain"] == 0.0 and off["metric_delta"] == 0.0 and not off["recommended"]
    assert off["measurements"] == 2  # the diagnostics ran too, and did not disturb the pairing either


def test_the_race_is_the_start_of_the_experiments_own_run(tmp_path):
    # The race trains in the experiment's Trainer, so its first steps are the experiment's: the baseline's race of
    # a whole run (its schedule, clipping and accumulation included) ends on the weights the full run ends on, and
    # its last reading is that run's validation loss.
    from auxloss.experiment.build import build_run

    cfg = _budget_cfg(n_train=128, epochs=2, seeds=1)
    cfg.train.lr_schedule, cfg.train.grad_clip, cfg.train.accumulate = "cosine", 0.5, 2
    cfg.train.eval_train = False
    full = build_run(cfg, "baseline", 0, device="cpu")
    full.trainer.fit(full.model, full.objective, full.loaders["train"])  # no val loader: the last weights
    expected = full.trainer.evaluate(full.model, full.objective, full.loaders["val"])["loss/main"]
    summary = run_probe(cfg, tmp_path, steps=4, every=2)  # 128 / 32 = 4 batches, 2 optimizer steps an epoch
    last = summary["baseline"]["validation"][-1]
    assert last["step"] == 4 and last["loss"] == expected


def test_weightings_that_read_validation_or_keep_representations_race_too(tmp_path):
    # main_progress reads the validation metrics the Trainer hands it at each epoch end (a race that passed an
    # epoch end without them crashed); representation mode keeps the taps' outputs for the step's own backward,
    # which a diagnostic forward would clear, so it races without diagnostics.
    cfg = _budget_cfg(n_train=128, epochs=3, seeds=1)  # 4 steps an epoch: a race of 10 passes two epoch ends
    cfg.variants[0].weighting = {"type": "main_progress"}
    cfg.variants[1].weighting = {"type": "gating", "mode": "representation"}
    summary = run_probe(cfg, tmp_path, steps=10, every=5)
    by = {c["variant"]: c for c in summary["candidates"]}
    assert [v["step"] for v in by["one"]["validation"]] == [5, 8, 10]
    assert by["one"]["measurements"] == 2 and by["one"]["diagnostics"]
    assert by["two"]["measurements"] == 0 and not by["two"]["diagnostics"]
    # Counted: each run's 10 steps and 3 readings, the baseline's start, main_progress's run's evaluations at the 2
    # epoch ends it passed (the others skip them), and the one candidate's 2 measurements of 1 task.
    assert summary["probe_steps"] == 3 * 10 + 3 * 3 + 1 + 2 + 2 * 2
