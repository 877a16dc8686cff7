"""Backends: the collective contract, its autograd pairs, sim, and torch.distributed."""
