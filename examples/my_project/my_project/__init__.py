"""A user's own project, as auxloss sees it: a model class and a dataset of ``(x, y)`` tuples (no auxloss code)."""
