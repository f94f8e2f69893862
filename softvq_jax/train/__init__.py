"""Training: the train state, pure jitted steps, the loop and the per-stage trainers."""
