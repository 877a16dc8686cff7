"""Meshes, layout rules, per-tensor layouts and redistribution planning (pure values)."""
