"""The worker agent: takes jobs from the queue and runs them in warm sandboxes."""
