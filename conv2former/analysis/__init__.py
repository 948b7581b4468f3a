"""The paper's analyses for any checkpoint: effective receptive fields (``erf``) and Grad-CAM (``gradcam``).

Run ``python -m conv2former.analysis erf ...`` (see ``__main__`` and docs/analysis.md).
"""
