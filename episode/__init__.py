"""The episode format both roles must agree on (the ground floor beside protocol/): prompts and the tag vocabulary,
token-in/token-out tokenisation of episodes, turn parsing, answer normalisation, and oracle episodes rendered as
chat messages and trajectories. Imports only protocol/ of forage; actors, the learner and data import it.
Imports nothing on import: pick the module you need."""
