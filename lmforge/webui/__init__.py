"""`lmforge webui`: a local web app to train, watch, chat with and export models (Gradio)."""
