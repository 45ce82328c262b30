"""Learning rate: linear warm-up, then step decay at fractions of the schedule."""

from __future__ import annotations

from training.config import SolverConfig


def learning_rate(iteration: int, solver: SolverConfig, total_iters: int) -> float:
    factor = 1.0
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        factor = solver.warmup_factor * (1 - alpha) + alpha
    steps_passed = sum(iteration >= int(fraction * total_iters) for fraction in solver.lr_steps)
    return solver.base_lr * factor * solver.lr_gamma**steps_passed
