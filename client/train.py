"""The client's local training loop, which lives in ``fedslm.training`` so the server can
train with the same code (FLTrust's root update, ``fedslm.server.fltrust``); re-exported
here for the client's modules, benchmarks and tests."""

from fedslm.training import (IGNORE_INDEX, EvalResult, TrainingSetup, TrainResult, evaluate_lm,
                             labels_for, make_training_setup, pack_texts, run_steps, train_local)

__all__ = ["IGNORE_INDEX", "EvalResult", "TrainResult", "TrainingSetup", "evaluate_lm",
           "labels_for", "make_training_setup", "pack_texts", "run_steps", "train_local"]
