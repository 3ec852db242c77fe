"""Evaluation: held-out perplexity, answers, multiple choice, reward-model accuracy, reward, KL, win-rate."""
