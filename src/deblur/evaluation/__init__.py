"""Scores: metrics, evaluation of pairs, the promotion gate."""
