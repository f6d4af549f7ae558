"""The same experiment as experiment.yaml, from Python: the numbers are identical for the same seeds.

    python examples/my_project/compare.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import auxloss as al  # noqa: E402
from my_project.data import build as make_data  # noqa: E402
from my_project.models import build  # noqa: E402


def make_model(seed: int):
    return build(in_features=64, width=64, depth=8, num_classes=10)


def main(out: str = "runs/my-project-py", seeds: int = 3, epochs: int = 5) -> dict:
    deep = al.Variant("deep-supervision", taps={"mid": al.Tap("body.3", al.LinearHead(10))},
                      tasks=[al.Task("mid", source="mid", weight=0.3)])
    return al.compare(model=make_model, data=make_data, variants=[deep], seeds=seeds, out=out, name="my-project",
                      train={"epochs": epochs, "lr": 0.003, "device": "cpu"}, batch_size=64)


if __name__ == "__main__":
    results = main()
    for c in results["comparisons"]:
        print(f"{c['variant']}: {100 * c['delta']:+.1f} points, Holm p = {c['p_holm']:.3f}: {c['verdict']}")
