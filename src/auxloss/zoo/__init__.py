"""Reference models and built-in datasets."""
