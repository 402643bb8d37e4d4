"""Expert caching (installed as `offload.cache`): cache policies as pure Python
over (layer, expert) ids, and the tiered expert store that carries out their
decisions. The offloaded engine lands here; today every expert is resident
(see offload/experts.py)."""
