"""Bundled toy models (METHODS §7) as TransformerLens ``HookedRootModule``s."""
