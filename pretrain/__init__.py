"""Masked audio-visual autoencoder pretraining (HiCMAE / VAEmo family).

`pretrain.encoders` and `pretrain.mae` import only torch, timm and einops, so exported encoders and
`finetune` never depend on Lightning.
"""
