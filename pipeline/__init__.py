"""MELT training pipeline: models, training phases, engines, evaluation."""
