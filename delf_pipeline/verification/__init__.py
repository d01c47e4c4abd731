"""Pairwise geometric verification: descriptor matching, then a robust (RANSAC) model fit."""
