"""The procedural audio-visual emotion dataset behind `emomae synth` (data_pipelines/synthetic.py):
parameters, voices, faces and captions, one module each."""
