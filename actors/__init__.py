"""Rollout actors: a vLLM engine playing MMSearch-R1 episodes (token-in/token-out) and shipping acked trajectory
groups to the learner. Imports nothing on purpose: vLLM's worker processes import actors.worker_extension."""
