"""Hugging Face transformers models, built from a config with random weights (nothing is downloaded).

- A tiny Mixtral (mixture of experts) called with ``output_router_logits=True`` returns its load-balancing loss as
  ``aux_loss``; auxloss collects it and weights it like any task. The reference is transformers' own training
  loss, ``lm_loss + router_aux_loss_coef·aux_loss`` (what ``MixtralForCausalLM`` returns when given labels).
- A tiny BERT with classifier heads on intermediate encoder layers. The reference is the same heads applied to
  the ``hidden_states`` that transformers itself reports for those layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _real import require

import auxloss as al
from auxloss import schedules as S

pytestmark = pytest.mark.integration

VOCAB = 64


def _mixtral():
    transformers = require("transformers")
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        output_router_logits=True, router_aux_loss_coef=0.02)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal language modelling: position t predicts token t+1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _lm_objective(router_weight):
    main = al.Task("main", select="logits", target="input_ids", loss=next_token_loss, metric=None)
    return al.Objective(main=main, aux=[al.Task.emitted("router", loss_name="aux_loss", weight=router_weight)])


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))


def _close(actual: dict, expected: dict) -> None:
    """float32 gradients of one computation done two ways: equal to float32 round-off."""
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        ref = expected[name]
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_mixtral_router_loss_is_collected_and_weighted_like_transformers_own_loss():
    net = _mixtral()
    reference = copy.deepcopy(net)
    ids = _ids(1)
    ref_out = reference(input_ids=ids, labels=ids)  # transformers adds router_aux_loss_coef * aux_loss itself
    ref_out.loss.backward()

    model = al.attach(net, {})  # no heads: the model's own auxiliary loss only
    objective = _lm_objective(net.config.router_aux_loss_coef)
    outputs = model(input_ids=ids)
    assert set(outputs.losses) == {"aux_loss"}
    torch.testing.assert_close(outputs.losses["aux_loss"], ref_out.aux_loss, rtol=0, atol=0)
    report = objective(outputs, {"input_ids": ids})
    assert report.weights == {"main": 1.0, "router": 0.02}
    torch.testing.assert_close(report.losses["router"], ref_out.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(report.total, ref_out.loss, rtol=1e-6, atol=1e-6)
    report.total.backward()
    _close({n.removeprefix("model."): p.grad for n, p in model.named_parameters()},
           {n: p.grad for n, p in reference.named_parameters()})


def test_mixtral_router_loss_follows_its_schedule_during_training():
    model = al.attach(_mixtral(), {})
    warmup = S.Warmup(0.02, steps=4)  # λ(t) = min(1, t/4)·0.02
    objective = _lm_objective(warmup)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(6):
        ids = _ids(10 + step)
        outputs = model(input_ids=ids)
        report = objective(outputs, {"input_ids": ids})
        expected = min(1.0, step / 4) * 0.02
        assert report.step == step and report.weights["router"] == pytest.approx(expected, rel=1e-12, abs=0)
        by_hand = next_token_loss(outputs.main.logits, ids) + expected * outputs.losses["aux_loss"]
        torch.testing.assert_close(report.total, by_hand, rtol=1e-6, atol=0)
        optimizer.zero_grad()
        objective.backward(report)
        optimizer.step()
        objective.advance()


def _hidden(output):
    # a BertLayer returns the hidden states (transformers 5) or a tuple starting with them (transformers 4)
    return output[0] if isinstance(output, tuple) else output


def test_bert_heads_on_intermediate_encoder_layers_read_the_layers_hidden_states():
    transformers = require("transformers")
    from auxloss.recipes import transformer_deep_supervision

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    net = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 2, 1, 2])
    layers = {"enc1": "bert.encoder.layer.1", "enc2": "bert.encoder.layer.2"}
    model, objective = transformer_deep_supervision(net, layers, 3, token="cls", select=_hidden,
                                                    example_input=ids[:1])
    objective.main.select = "logits"  # the main output is a SequenceClassifierOutput
    reference, ref_heads = copy.deepcopy(model.model), copy.deepcopy(model.heads)

    model.train()
    outputs = model(input_ids=ids)
    report = objective(outputs, {"input": ids, "target": y})
    report.total.backward()

    ref_out = reference(input_ids=ids, output_hidden_states=True)  # hidden_states[i + 1] is layer i's output
    ref_aux = {"enc1": ref_heads["enc1"](ref_out.hidden_states[2]), "enc2": ref_heads["enc2"](ref_out.hidden_states[3])}
    for name, value in ref_aux.items():
        assert outputs.aux[name].shape == (4, 3)
        torch.testing.assert_close(outputs.aux[name], value, rtol=1e-6, atol=1e-6)
    ref_loss = (F.cross_entropy(ref_out.logits, y) + 0.3 * F.cross_entropy(ref_aux["enc1"], y)
                + 0.3 * F.cross_entropy(ref_aux["enc2"], y))
    torch.testing.assert_close(report.total, ref_loss, rtol=1e-6, atol=1e-6)
    ref_loss.backward()
    _close({n: p.grad for n, p in model.named_parameters()},
           {**{f"model.{n}": p.grad for n, p in reference.named_parameters() if p.grad is not None},
            **{f"heads.{n}": p.grad for n, p in ref_heads.named_parameters()}})
