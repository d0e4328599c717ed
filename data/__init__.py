"""The synthetic knowledge world (entities, images, facts, search corpora, questions) and oracle episodes."""
from data.world import (
    KINDS, SEARCH_LABEL, Entity, World, WorldConfig, WorldPaths, config_hash, ensure_world, load_world,
    world_texts, write_world,
)

__all__ = [
    "KINDS", "SEARCH_LABEL", "Entity", "World", "WorldConfig", "WorldPaths", "config_hash", "ensure_world",
    "load_world", "world_texts", "write_world",
]
