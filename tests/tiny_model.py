"""The small ModelConfig sizes the model tests share, as keyword dicts (`ModelConfig(**TINY)`).

Each size is `tiny(**changes)`: the base below with the fields a test needs changed, so that a test
names only what it relies on."""

# the base: 4 frames of 32 x 32 -> 2 x 2 x 2 = 8 video tokens; a 64 x 32 fbank -> 8 audio tokens
_INPUTS = dict(num_frames=4, img_size=32, fbank_frames=64, mel_bins=32)
# three blocks deep, two levels to the fusion
_ENCODER = dict(width=64, heads=2, depth=3, fusion_depth=1, skip_layers=[1, 3])
_DECODER = dict(decoder_width=32, decoder_heads=2, decoder_depth=3)


def tiny(**changes) -> dict:
    """The base size with `changes`; a fresh dict each call (callers may change it)."""
    size = {**_INPUTS, **_ENCODER, **_DECODER, **changes}
    return size | {"skip_layers": list(size["skip_layers"])}


# the smallest: a 32 x 32 fbank -> 4 audio tokens, four blocks deep
TINY = tiny(fbank_frames=32, depth=4, decoder_heads=1, decoder_depth=4, skip_layers=[2, 3, 4])
# at the test shards' size (tests/conftest.py SHARD_TEST_SIZE, FbankConfig(fbank_frames=128)):
# 8 frames of 64 x 64 and a 128 x 128 fbank, two blocks deep
SHARD_INPUTS = dict(num_frames=8, img_size=64, fbank_frames=128, mel_bins=128)
SHARD_TINY = tiny(**SHARD_INPUTS, depth=2, decoder_heads=1, skip_layers=[1, 2])
