"""auxloss: auxiliary losses for any PyTorch model.

Attach heads to named layers of the model you already have, weight their losses well, and find out whether they
helped the main task::

    import auxloss as al
    model = al.attach(net, {"aux1": al.Tap("layer2", al.LinearHead(10))}, example_input=x[:1])
    objective = al.Objective(aux=[al.Task("aux1", source="aux1", weight=0.3)])
    report = objective(model(x), {"input": x, "target": y})
    report.total.backward()
"""

from auxloss import schedules
from auxloss._version import __version__ as __version__  # re-exported
from auxloss.errors import AuxLossError
from auxloss.heads import DenseHead, InceptionAuxHead, LinearHead, MLPHead, SequenceHead
from auxloss.objective import LossReport, Objective
from auxloss.taps import AuxModel, Outputs, Tap, attach, emit, list_layers
from auxloss.tasks import Task


def __getattr__(name: str) -> object:
    # The experiment stack (auxloss.compare, auxloss.Variant) is the `experiment` extra: imported on first use, so
    # that `import auxloss` needs only torch and numpy.
    if name == "compare":
        from auxloss.experiment.compare import compare

        return compare
    if name == "Variant":
        from auxloss.experiment.spec import Variant

        return Variant
    raise AttributeError(f"module 'auxloss' has no attribute {name!r}")

__all__ = [
    "AuxLossError",
    "AuxModel",
    "DenseHead",
    "InceptionAuxHead",
    "LinearHead",
    "LossReport",
    "MLPHead",
    "Objective",
    "Outputs",
    "SequenceHead",
    "Tap",
    "Task",
    "Variant",
    "attach",
    "compare",
    "emit",
    "list_layers",
    "schedules",
]
