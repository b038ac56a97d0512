"""DIFFusion: counterfactual edits between two image classes with the Kandinsky 2.2 decoder (arXiv 2504.08046).

Modules: config (schemas), models (loading + shared model steps), inversion (pure math), embeddings (class directions),
editing (the editing run), data (DataConfig -> datasets), precompute (save_embeds), tiny (test-size models).
"""
