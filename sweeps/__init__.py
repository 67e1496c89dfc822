"""Many runs: Ray Tune + Optuna sweeps over the training driver (presets, resume, MLflow comparison)."""
