"""The model panel: one client per model (readings and synthesis), prompts, the reading cache."""
