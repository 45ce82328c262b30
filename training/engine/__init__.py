"""The training loop and what it needs: run directories, checkpoints, sampling, schedules, DDP."""
