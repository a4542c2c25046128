"""Evaluation of trained models beyond the training losses: prompt following on the synthetic shapes
(``prompt_following``: colour and direction read back from sampled clips in pixels)."""
