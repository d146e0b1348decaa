"""Ablation studies and hyperparameter searches over the training run, on Ray Tune + Optuna + MLflow."""
