"""Figures shared by the margin commands, the callback and the analyses: the paper's margin plot and its helpers
(`margins`)."""
