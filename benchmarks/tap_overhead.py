"""Overhead of attaching heads through auxloss's forward hooks, measured side by side in one process.

1. ``hooks_vs_handwritten``: a training step (forward, objective, backward, optimizer step) of a CNN with two
   heads attached by ``auxloss.attach``, against the same CNN with the same heads wired by hand into its
   ``forward``.
2. ``stripped_vs_plain``: inference of the model given back by ``strip()``, against a plain copy that never had
   hooks.

The variants run interleaved, round after round, and each ratio is the median of per-round ratios, so drift in
the machine's speed cancels out. The last line printed is one JSON object.

    python benchmarks/tap_overhead.py [--rounds 15] [--iters 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import auxloss as al
from auxloss.zoo.models import SmallCNN


class HandWired(nn.Module):
    """The same trunk and heads, with the heads called explicitly in forward (what users write by hand)."""

    def __init__(self, trunk: SmallCNN, head1: nn.Module, head2: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head1, self.head2 = trunk, head1, head2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.trunk
        f1 = t.block1(x)
        f2 = t.block2(f1)
        f3 = t.block3(f2)
        main = t.fc(t.dropout(torch.flatten(t.pool(f3), 1)))
        return main, self.head1(f1), self.head2(f2)


def timed(fn, iters: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()  # CUDA runs asynchronously: wait for the queued work before reading the clock
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    trunk = SmallCNN(10, width=args.width).to(device)
    hooked = al.attach(copy.deepcopy(trunk), {"aux1": al.Tap("block1", al.LinearHead(10)),
                                              "aux2": al.Tap("block2", al.LinearHead(10))}, example_input=x[:1])
    # The same heads (same initial weights) wired by hand.
    hand = HandWired(copy.deepcopy(trunk), copy.deepcopy(hooked.heads["aux1"]), copy.deepcopy(hooked.heads["aux2"]))
    objective = al.Objective(aux=[al.Task("aux1", source="aux1", weight=0.3),
                                  al.Task("aux2", source="aux2", weight=0.3)])
    batch = {"input": x, "target": y}
    opt_hooked = torch.optim.SGD(hooked.parameters(), lr=1e-3)
    opt_hand = torch.optim.SGD(hand.parameters(), lr=1e-3)

    def step_hooked() -> None:
        report = objective(hooked(x), batch)
        opt_hooked.zero_grad(set_to_none=True)
        report.total.backward()
        opt_hooked.step()

    def step_hand() -> None:
        main, a1, a2 = hand(x)
        loss = F.cross_entropy(main, y) + 0.3 * F.cross_entropy(a1, y) + 0.3 * F.cross_entropy(a2, y)
        opt_hand.zero_grad(set_to_none=True)
        loss.backward()
        opt_hand.step()

    plain = copy.deepcopy(trunk).eval()
    stripped = al.attach(copy.deepcopy(trunk), {"aux1": al.Tap("block1", al.LinearHead(10))},
                         example_input=x[:1]).strip().eval()

    @torch.no_grad()
    def infer(model: nn.Module) -> None:
        model(x)

    for fn in (step_hooked, step_hand, lambda: infer(plain), lambda: infer(stripped)):  # warm-up
        timed(fn, 3)
    train_ratios, infer_ratios, t_hook, t_hand, t_plain, t_strip = [], [], [], [], [], []
    for r in range(args.rounds):
        # Alternate which goes first, so neither always runs on a warmer cache.
        if r % 2:
            a, b = timed(step_hooked, args.iters), timed(step_hand, args.iters)
            c, d = timed(lambda: infer(stripped), args.iters), timed(lambda: infer(plain), args.iters)
        else:
            b, a = timed(step_hand, args.iters), timed(step_hooked, args.iters)
            d, c = timed(lambda: infer(plain), args.iters), timed(lambda: infer(stripped), args.iters)
        t_hook.append(a), t_hand.append(b), t_strip.append(c), t_plain.append(d)
        train_ratios.append(a / b)
        infer_ratios.append(c / d)
    result = {
        "hooks_vs_handwritten": round(statistics.median(train_ratios), 4),
        "stripped_vs_plain": round(statistics.median(infer_ratios), 4),
        "train_step_ms": {"auxloss": round(1e3 * statistics.median(t_hook), 3),
                          "handwritten": round(1e3 * statistics.median(t_hand), 3)},
        "inference_ms": {"stripped": round(1e3 * statistics.median(t_strip), 3),
                         "plain": round(1e3 * statistics.median(t_plain), 3)},
        "rounds": args.rounds, "iters": args.iters, "batch": args.batch, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(), "device": str(device),
    }
    print(f"train step: auxloss {result['train_step_ms']['auxloss']} ms, hand-wired "
          f"{result['train_step_ms']['handwritten']} ms; inference: stripped {result['inference_ms']['stripped']} "
          f"ms, plain {result['inference_ms']['plain']} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
