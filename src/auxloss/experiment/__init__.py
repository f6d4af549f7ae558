"""Experiments: configs, runner, store, statistics, report."""
