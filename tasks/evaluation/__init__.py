"""Accuracy against labels: metrics with intervals, plots, outputs, the regression alert."""
