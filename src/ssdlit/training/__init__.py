"""Training: the optimiser and schedule, callbacks, checkpoint IO, and the loggers,
callbacks and Trainer of a run built from its config."""
