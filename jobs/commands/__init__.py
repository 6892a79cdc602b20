"""Sub-commands of the vidprune CLI, one module each."""
