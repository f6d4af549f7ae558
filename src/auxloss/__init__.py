"""auxloss: auxiliary losses for any PyTorch model."""
