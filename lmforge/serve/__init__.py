"""`lmforge serve`: an OpenAI-compatible HTTP server over the batched streaming generation engine."""
