"""Using a trained model: terminal chat and batch generation."""
