"""What runs the stages: the Ray session, resource arithmetic, the TorchTrainer builder, collectives."""
