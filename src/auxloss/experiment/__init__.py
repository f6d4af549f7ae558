"""Experiments: configs, runner, store, statistics, report, sweep.

They need the ``experiment`` extra (``pip install 'auxloss[experiment]'``): scipy, pydantic, PyYAML, matplotlib,
rich, Optuna and SQLAlchemy. Importing anything from this package first checks that all of them are there, so a
missing one is one clear error naming the extra, not a ``ModuleNotFoundError`` from deep inside a module.
"""

from auxloss._extras import EXPERIMENT_PACKAGES, require_all

require_all(EXPERIMENT_PACKAGES, "experiment",
            what="the experiment stack (configs, runner, statistics, report, sweep, and the CLI built on them)")
