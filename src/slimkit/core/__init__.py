"""The bottom layer: errors, configs and the one registry, tasks, targets, model editing."""
