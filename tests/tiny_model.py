"""The smallest ModelConfig the model tests share: 4 frames of 32 x 32 -> 2 x 2 x 2 = 8 video tokens;
a 32 x 32 fbank -> 4 audio tokens."""

TINY = dict(
    num_frames=4,
    img_size=32,
    fbank_frames=32,
    mel_bins=32,
    width=64,
    heads=2,
    depth=4,
    fusion_depth=1,
    decoder_width=32,
    decoder_heads=1,
    decoder_depth=4,
    skip_layers=[2, 3, 4],
)
