"""Stage 1: run the model, capture its graph and find its input-sharing groups (``groups.find_groups``)."""
