"""Export, probing and fine-tuning of pretrained audio-visual emotion encoders."""
