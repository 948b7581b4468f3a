"""The ImageNet-22k pretraining stage: its recipe lives in pretrain/configs/."""
