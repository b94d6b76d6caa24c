"""Training support: config builders, callbacks, optimisers, checkpoint IO, pictures."""
