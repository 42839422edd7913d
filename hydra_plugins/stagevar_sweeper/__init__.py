"""The lab's Hydra plugin: the sweeper that skips finished jobs (a Hydra plugin must live in hydra_plugins)."""
