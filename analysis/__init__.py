"""Analyses beyond the paper: 2-D margin maps, control subspaces, Fourier heat maps, run comparison, CSV export."""
