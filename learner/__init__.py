"""forage's learner: FSDP2 ranks that turn acked trajectory groups into GRPO/decoupled-PPO updates and publish
versioned weights; a role (docs/architecture.md): imports floors 0-1 only. Entry point: `learner.role.LearnerRank`;
pure maths in `advantages`, `losses`, `admission`."""
