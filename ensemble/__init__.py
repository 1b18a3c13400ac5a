"""What the stages share: config, run directory, data sets, networks, the training loop, the pipeline, the CLI."""
