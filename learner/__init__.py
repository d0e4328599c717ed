"""forage's learner: FSDP2 ranks that turn acked trajectory groups into GRPO/decoupled-PPO updates and publish
versioned weights. Entry point: `learner.role.LearnerRank`; pure maths in `advantages`, `losses`, `admission`."""
