"""Training: mesh and sharding rules, the jitted step, the host loop, checkpoints, the phases."""
