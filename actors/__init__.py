"""Rollout actors: a vLLM engine playing MMSearch-R1 episodes (token-in/token-out) and shipping acked trajectory
groups to the learner; a role (docs/architecture.md): imports floors 0-1 and the tool servers' client library only.
Imports nothing on purpose: vLLM's worker processes import actors.worker_extension."""
