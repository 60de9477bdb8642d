"""The synthetic knowledge world: its people (``types``), their text (``text``), the generator and its training
corpus (``generator``), the evaluation splits and reading drills (``splits``, ``drills``) and the on-disk schema
(``disk``, see docs/world_schema.md)."""
