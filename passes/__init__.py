"""FX graph passes, independent of how a model was quantized: they depend on torch and networkx
only and never import ``glowq_fx``.

- ``groups``: the shared types (``InputGroup``, ``GroupFilter``, ``group_name``).
- ``grouping``: the linears that read one input, from a captured graph.
- ``rewrite``: one shared projection per group and the group's members in one node.
- ``_dynamo``: the private Dynamo details the passes and the capture read.
"""
