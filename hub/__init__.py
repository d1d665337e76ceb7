"""The hub: the model catalog and its downloads (`edge-qwen pull`, `edge-qwen models`).

A layer of its own between the apps and the exporter (DESIGN.md, "Layers"): it may import the
exporter and the core; the core never imports it.
"""
