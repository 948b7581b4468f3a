"""Conv2Former: a Transformer-style ConvNet built on convolutional modulation.

Paper: "Conv2Former: A Simple Transformer-Style ConvNet for Visual Recognition" (Hou et al.).

The structure and the state_dict names follow the official release exactly (see docs/design.md, "The model"),
so the released checkpoints load with ``load_state_dict(strict=True)``:

    downsample_layers.0          stem: conv3x3/2 (no bias) GELU BN, conv3x3 (no bias) GELU BN, conv2x2/2 (no bias)
    downsample_layers.{1,2,3}    LayerNorm2d, conv2x2/2
    stages.{i}.{j}               Block: x + dp(ls1 * attn(x)), x + dp(ls2 * mlp(x))
    head                         conv1x1 C3->1280, GELU, LayerNorm2d  (applied before global average pooling)
    pred                         Linear(1280, num_classes)

Variants are registered with timm (``import conv2former; timm.create_model("conv2former_l")``).
``python -m conv2former.complexity --table`` prints parameters and MACs of every variant next to the paper.
"""

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.fx._symbolic_trace import is_fx_tracing
from torch.utils.checkpoint import checkpoint

from conv2former.depthwise import DepthwiseConv2d

__all__ = ["Conv2Former", "Conv2FormerIsotropic", "ConvMod", "MLP", "Block", "BatchNorm2dFP32", "FUSIONS", "VARIANTS"]

FUSIONS = ("hadamard", "sum", "sigmoid", "l1", "linear01")
"""How the modulation weights A = DWConv(GELU(W1 x)) meet the value V = W2 x (paper Table 7).

hadamard  A * V (the paper's choice, the default)
sum       A + V (element-wise summation, paper Fig. 5b)
sigmoid   sigmoid(A) * V
l1        (A / ||A||_1) * V, the L1 norm taken over channels at each position
linear01  A linearly rescaled to (0, 1] per sample and channel over the spatial positions, times V
"""


def _fuse(a: torch.Tensor, v: torch.Tensor, fusion: str) -> torch.Tensor:
    if fusion == "hadamard":
        return a * v
    if fusion == "sum":
        return a + v
    if fusion == "sigmoid":
        return torch.sigmoid(a) * v
    if fusion == "l1":
        return F.normalize(a, p=1.0, dim=1) * v
    if fusion == "linear01":
        eps = 1e-6
        a_min = a.amin(dim=(2, 3), keepdim=True)
        a_max = a.amax(dim=(2, 3), keepdim=True)
        return ((a - a_min + eps) / (a_max - a_min + eps)) * v
    raise ValueError("unknown fusion '" + fusion + "': choose hadamard, sum, sigmoid, l1 or linear01")


class BatchNorm2dFP32(nn.BatchNorm2d):
    """The stem's BatchNorm, computed in float32 whatever the precision of the input and the parameters.

    Same parameters, buffers and names as ``nn.BatchNorm2d``. DeepSpeed's bf16 mode casts parameters but not buffers,
    so a plain BatchNorm would meet bf16 input and weight with fp32 running statistics, which PyTorch rejects; and
    batch statistics of bf16 activations lose precision. Mixed-precision practice keeps BatchNorm in fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No branch on the input's dtype, so torch.fx traces it; .float()/.to() are no-ops for fp32 tensors.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        out = F.batch_norm(
            x.float(),
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            use_batch_stats,
            momentum,
            self.eps,
        )
        return out.to(x.dtype)


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and buffers to ``dtype``, except the fp32 BatchNorm's statistics (BatchNorm2dFP32)."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        if isinstance(module, BatchNorm2dFP32):
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)


def factory_kwargs(init: Callable[..., None]) -> Callable[..., None]:
    """timm's factory arguments for a model class's ``__init__``: ``device`` (parameters and buffers are created
    there, ``"meta"`` included: the construction runs under ``torch.device(device)``) and ``dtype`` (floating
    parameters and buffers in it, the stem BatchNorm's statistics kept fp32). Any other unknown keyword is
    Python's TypeError, as for timm's own models."""

    @functools.wraps(init)
    def wrapped(
        self: nn.Module, *args: Any, device: Any = None, dtype: Optional[torch.dtype] = None, **kwargs: Any
    ) -> None:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            _cast_floating(self, dtype)

    return wrapped


class MLP(nn.Module):
    """Channel MLP with a 3x3 depthwise positional branch: fc2(h + GELU(pos(h))), h = GELU(fc1(LN(x)))."""

    def __init__(self, dim: int, mlp_ratio: int = 4, fast_depthwise: bool = True) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.pos = DepthwiseConv2d(hidden, 3, fast_backward=fast_depthwise)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(self.norm(x)))
        x = x + self.act(self.pos(x))
        return self.fc2(x)


class ConvMod(nn.Module):
    """Convolutional modulation: proj(A ⊙ V), A = DWConv_k(GELU(W1 LN(x))), V = W2 LN(x)."""

    def __init__(self, dim: int, kernel_size: int = 11, fusion: str = "hadamard", fast_depthwise: bool = True) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}: choose one of {', '.join(FUSIONS)}")
        self.fusion = fusion  # (DepthwiseConv2d below checks kernel_size)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.att = nn.Sequential(
            nn.Conv2d(dim, dim, 1),
            nn.GELU(),
            DepthwiseConv2d(dim, kernel_size, fast_backward=fast_depthwise),
        )
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.proj(_fuse(self.att(x), self.v(x), self.fusion))


class Block(nn.Module):
    """Conv2Former block: a convolutional-modulation layer and an MLP, each residual with layer scale."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 11,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        fusion: str = "hadamard",
        fast_depthwise: bool = True,
    ) -> None:
        super().__init__()
        self.attn = ConvMod(dim, kernel_size, fusion, fast_depthwise)
        self.mlp = MLP(dim, mlp_ratio, fast_depthwise)
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1.view(1, -1, 1, 1) * self.attn(x))
        x = x + self.drop_path(self.layer_scale_2.view(1, -1, 1, 1) * self.mlp(x))
        return x


def _classifier_head(in_dim: int, head_dim: int) -> nn.Sequential:
    """The official pre-pool head: conv1x1 -> GELU -> LayerNorm2d."""
    return nn.Sequential(nn.Conv2d(in_dim, head_dim, 1), nn.GELU(), LayerNorm2d(head_dim, eps=1e-6))


def _conv_stem(in_chans: int, mid: int, out: int, middle_stride: int, patch: int) -> nn.Sequential:
    """The three-convolution stem: conv3x3/2 -> GELU -> BN, conv3x3/``middle_stride`` -> GELU -> BN, then a
    ``patch`` x ``patch`` convolution of that stride; no conv biases, fp32 BatchNorm. The hierarchical models' stem
    (strides 2, 1, 2: to stride 4) and the isotropic "3 Convs" stem (2, 2, 4: to stride 16)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, bias=False),
        nn.GELU(),
        BatchNorm2dFP32(mid),
        nn.Conv2d(mid, mid, 3, stride=middle_stride, padding=1, bias=False),
        nn.GELU(),
        BatchNorm2dFP32(mid),
        nn.Conv2d(mid, out, patch, stride=patch, bias=False),
    )


def _run_blocks(blocks: Any, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Run ``blocks`` (an ``nn.Sequential`` or a list of blocks) in order; with ``checkpointing``, recompute each one's activations in the backward pass.

    Checkpointing applies only where a backward pass will follow: not under no_grad, and not while torch.fx traces
    the model (a traced graph runs the blocks plainly: checkpointing is not a graph operation). Never compiled by
    TorchScript (the callers take the plain path when scripting).
    """
    checkpointing = checkpointing and torch.is_grad_enabled() and not is_fx_tracing()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
    return x


def _init_weights(module: nn.Module) -> None:
    # a model built on the meta device (shapes only: registry checks, export config) has no values to draw, and
    # trunc_normal_ on meta tensors runs through slow reference decompositions (20 s for the 11 variants)
    if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.is_meta:
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


POOLS = ("avg", "")
"""``global_pool`` values: "avg" (the paper's global average pooling) or "" (timm's "no pooling": ``forward_head``
returns the head's unpooled map, and with classes the per-position logits)."""


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOLS:
        raise ValueError(f"Conv2Former global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


class _ClassifierMixin:
    """What both model families share: timm's classifier interface (``head`` before pooling, then ``pred``), the
    feature interface (``forward_intermediates``, ``prune_intermediate_layers``) and activation checkpointing.

    Subclasses set ``head`` (conv1x1, GELU, LayerNorm2d), ``pred``, ``num_classes``, ``head_hidden_size``,
    ``global_pool`` and ``grad_checkpointing``, and say what their feature levels are: ``_levels()`` (each level's
    input module and its blocks, in order) and ``_keep_levels(n)`` (drop the levels after the first ``n``).
    """

    if TYPE_CHECKING:  # what the subclasses provide (declared for the type checker only: TorchScript reads annotations)
        grad_checkpointing: bool
        global_pool: str
        num_classes: int
        head_hidden_size: int
        head: nn.Module
        pred: nn.Module

        def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

        def _levels(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], Any]]: ...

        def _keep_levels(self, count: int) -> None: ...

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory at large inputs)."""
        self.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Each level's output (the stages: strides 4/8/16/32; the isotropic blocks: 16) for dense tasks;
        ``indices`` as in timm."""
        if output_fmt != "NCHW":
            raise ValueError("Conv2Former features are NCHW")
        levels = self._levels()
        take, max_index = feature_take_indices(len(levels), indices)
        intermediates = []
        last = len(levels) - 1 if not stop_early else max_index
        for i in range(last + 1):
            before, blocks = levels[i]
            x = _run_blocks(blocks, before(x), self.grad_checkpointing)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take, max_index = feature_take_indices(len(self._levels()), indices)
        self._keep_levels(max_index + 1)
        if prune_head:
            self.head = nn.Sequential()
            self.reset_classifier(0)
        return take

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.pred

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        module = cast(nn.Module, self)  # (a mixin of nn.Module subclasses)
        like = next(module.parameters())  # the new classifier on the model's device, in its dtype and mode, as timm's
        if num_classes > 0:
            self.pred = nn.Linear(self.head_hidden_size, num_classes, device=like.device, dtype=like.dtype)
            _init_weights(self.pred)
        else:
            self.pred = nn.Identity()
        self.pred.train(module.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head(x)
        if self.global_pool == "avg":
            x = x.mean((2, 3))
            return x if pre_logits else self.pred(x)
        if pre_logits:
            return x
        return self.pred(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-position logits, NCHW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Conv2Former(_ClassifierMixin, nn.Module):
    """Hierarchical Conv2Former (variants N/T/S/B/L of the paper).

    ``fast_depthwise`` (default True) computes the depthwise convolutions (the k x k modulation and the MLP's 3x3)
    the way the process's depthwise chooser says, where one is installed (conv2former/depthwise.py; the engine
    installs conv2former/cpu's tuner on CPU runs): same parameters, same math. False is the plain ``nn.Conv2d``
    everywhere.
    """

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 12, 3),
        dims: Sequence[int] = (72, 144, 288, 576),
        kernel_size: int = 11,
        mlp_ratio: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_dim: int = 1280,
        fusion: str = "hadamard",
        global_pool: str = "avg",
        fast_depthwise: bool = True,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"Conv2Former has 4 stages: got depths={list(depths)}, dims={list(dims)}")
        if drop_rate:
            raise ValueError("Conv2Former has no classifier dropout (drop_rate); use drop_path_rate")
        self.num_classes = num_classes
        self.in_chans = in_chans  # timm's model attribute (its tests/test_models.py checks it against the cfg)
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        self.kernel_size = kernel_size
        self.fusion = fusion
        self.global_pool = _check_pool(global_pool)
        self.num_features = dims[-1]
        self.head_hidden_size = head_dim
        self.grad_checkpointing = False

        self.downsample_layers = nn.ModuleList([_conv_stem(in_chans, dims[0] // 2, dims[0], middle_stride=1, patch=2)])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6),
                    nn.Conv2d(dims[i], dims[i + 1], 2, stride=2),
                )
            )

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # as the official code
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(dim, kernel_size, mlp_ratio, rate, layer_scale_init_value, fusion, fast_depthwise)
                            for rate in rates[start : start + depth]])
            for depth, dim, start in zip(depths, dims, starts)
        )  # fmt: skip
        self.feature_info: List[Dict[str, Any]] = [
            dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}") for i, dim in enumerate(dims)
        ]

        self.head = _classifier_head(dims[-1], head_dim)
        self.pred = nn.Linear(head_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order (stem, downsample + blocks, head) for layer-wise lr decay."""
        return dict(
            stem=r"^downsample_layers\.0\.",
            blocks=r"^(?:downsample_layers|stages)\.(\d+)"
            if coarse
            else [
                (r"^downsample_layers\.(\d+)\.", (0,)),
                (r"^stages\.(\d+)\.(\d+)\.", None),
            ],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = downsample(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = _run_blocks(stage, x, checkpointing=True)
            else:
                x = stage(x)
        return x

    def _levels(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], Any]]:
        return list(zip(self.downsample_layers, self.stages))

    def _keep_levels(self, count: int) -> None:
        self.stages = self.stages[:count]
        self.downsample_layers = self.downsample_layers[:count]


class Conv2FormerIsotropic(_ClassifierMixin, nn.Module):
    """Isotropic (ViT-style) Conv2Former of paper Table 8: one patch embedding to stride 16, then equal blocks.

    ``stem="patch"``: one 16x16 stride-16 convolution; ``stem="convs"``: three convolutions
    (3x3/2 -> GELU -> BN, 3x3/2 -> GELU -> BN, 4x4/4), the "3 Convs" row of Table 8.
    """

    @factory_kwargs
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depth: int = 18,
        dim: int = 320,
        kernel_size: int = 11,
        mlp_ratio: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_dim: int = 1280,
        fusion: str = "hadamard",
        stem: str = "patch",
        global_pool: str = "avg",
        fast_depthwise: bool = True,
    ) -> None:
        super().__init__()
        if drop_rate:
            raise ValueError("Conv2Former has no classifier dropout (drop_rate); use drop_path_rate")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.kernel_size = kernel_size
        self.fusion = fusion
        self.global_pool = _check_pool(global_pool)
        self.num_features = dim
        self.head_hidden_size = head_dim
        self.grad_checkpointing = False
        if stem == "patch":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, 16, stride=16))
        elif stem == "convs":
            self.stem = _conv_stem(in_chans, dim // 4, dim, middle_stride=2, patch=4)
        else:
            raise ValueError(f"unknown isotropic stem {stem!r}: choose 'patch' or 'convs'")
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(
            *[
                Block(dim, kernel_size, mlp_ratio, rates[i], layer_scale_init_value, fusion, fast_depthwise)
                for i in range(depth)
            ]
        )
        self.feature_info = [dict(num_chs=dim, reduction=16, module=f"blocks.{i}") for i in range(depth)]
        self.head = _classifier_head(dim, head_dim)
        self.pred = nn.Linear(head_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem\.", blocks=r"^blocks\.(\d+)\.")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return _run_blocks(self.blocks, x, checkpointing=True)
        return self.blocks(x)

    def _levels(self) -> List[Tuple[Callable[[torch.Tensor], torch.Tensor], Any]]:
        return [(self.stem if i == 0 else _identity, [block]) for i, block in enumerate(self.blocks)]

    def _keep_levels(self, count: int) -> None:
        self.blocks = self.blocks[:count]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Variants, paper figures and timm registration
# ---------------------------------------------------------------------------------------------------------------------

VARIANTS: Dict[str, Dict[str, Any]] = {
    "conv2former_n": dict(dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), kernel_size=7),
    "conv2former_t": dict(dims=(72, 144, 288, 576), depths=(3, 3, 12, 3), kernel_size=11),
    "conv2former_s": dict(dims=(72, 144, 288, 576), depths=(4, 4, 32, 4), kernel_size=11),
    "conv2former_b": dict(dims=(96, 192, 384, 768), depths=(4, 4, 34, 4), kernel_size=11),
    "conv2former_b_22k": dict(dims=(96, 192, 384, 768), depths=(4, 4, 34, 4), kernel_size=7),
    "conv2former_l": dict(dims=(128, 256, 512, 1024), depths=(4, 4, 48, 4), kernel_size=11),
    "conv2former_demo": dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), kernel_size=7),
    "conv2former_is": dict(isotropic=True, dim=320, depth=18, kernel_size=11, stem="patch"),
    "conv2former_is_convs": dict(isotropic=True, dim=320, depth=18, kernel_size=11, stem="convs"),
    "conv2former_ib": dict(isotropic=True, dim=640, depth=18, kernel_size=11, stem="patch"),
    "conv2former_ib_convs": dict(isotropic=True, dim=640, depth=18, kernel_size=11, stem="convs"),
}

# (params in millions, GMACs at 224, GMACs at 384) as printed in the paper (Tables 1, 3, 4, 6, 8), 1000 classes.
PAPER_FIGURES: Dict[str, Tuple[Optional[float], Optional[float], Optional[float]]] = {
    "conv2former_n": (15, 2.2, None),
    "conv2former_t": (27, 4.4, None),
    "conv2former_s": (50, 8.7, None),
    "conv2former_b": (90, 15.9, 46.7),
    "conv2former_b_22k": (89, 15.6, None),
    "conv2former_l": (199, 36.0, 105.9),
    "conv2former_demo": (None, None, None),
    "conv2former_is": (23, 4.3, None),
    "conv2former_is_convs": (23, 4.5, None),
    "conv2former_ib": (86, 16.5, None),
    "conv2former_ib_convs": (87, 17.3, None),
}


PAPER = dict(
    license="mit",  # the official code's license; this registry carries no weights (url and hf_hub_id are empty)
    paper_ids="arXiv:2211.11943",
    paper_name="Conv2Former: A Simple Transformer-Style ConvNet for Visual Recognition",
    origin_url="https://github.com/HVision-NKU/Conv2Former",
)


def _cfg(reduction: int = 32, **kwargs: Any) -> Dict[str, Any]:
    """A variant's pretrained_cfg: what ``timm.data.resolve_data_config({}, model=model)`` reads (the eval transform
    of our recipes: 224 px, bicubic, shorter side to 224 / 0.875 then center crop, ImageNet mean/std) and the
    names timm's helpers look up (first conv, classifier)."""
    size = kwargs.get("input_size", (3, 224, 224))[-1]
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (size // reduction,) * 2,
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0",
        "classifier": "pred",
        **PAPER,
        **kwargs,
    }


def _variant_cfgs(name: str, spec: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Three tags per variant: the 1k model at 224 (the default), the ImageNet-22k pretraining head (21,841 classes in
    timm's imagenet-22k order, so ``timm.data.ImageNetInfo`` names them) and the 1k model fine-tuned at 384 (our
    finetune_384 recipe: squash to 384, no crop)."""
    extra: Dict[str, Any] = dict(first_conv="stem.0", reduction=16) if spec.get("isotropic") else {}
    return {
        f"{name}.untrained": _cfg(**extra),
        f"{name}.in22k": _cfg(num_classes=21841, **extra),
        f"{name}.in22k_ft_in1k_384": _cfg(input_size=(3, 384, 384), crop_pct=1.0, crop_mode="squash", **extra),
    }


default_cfgs = generate_default_cfgs(
    {tag: cfg for name, spec in VARIANTS.items() for tag, cfg in _variant_cfgs(name, spec).items()}
)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's pretrained loading (``local-dir:`` exports, ``pretrained_cfg_overlay=dict(file=...)``): unwrap
    official/DeepSpeed/DDP checkpoints, and stop with a one-line ``UserError`` naming both architectures when the
    weights belong to another variant (the head is left to timm when ``num_classes`` asks for a new one)."""
    from conv2former.weights import check_compatible, unwrap_state_dict

    state_dict = unwrap_state_dict(state_dict)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    source = cfg.get("file") or cfg.get("hf_hub_id") or "the pretrained weights"
    new_head = model.num_classes != cfg.get("num_classes")
    architecture = cfg.get("architecture", "this model")
    check_compatible(
        model,
        state_dict,
        f"{source} (loaded as {architecture})",
        skip_head=new_head,
        hint=f"the weights are not a {architecture}: correct 'architecture' in the folder's config.json, "
        "or re-export the run with launch/export.py",
    )
    return state_dict


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    spec = dict(VARIANTS[variant])
    isotropic = spec.pop("isotropic", False)
    model_cls = Conv2FormerIsotropic if isotropic else Conv2Former
    model_args = {**spec, **kwargs}
    # the four stages; isotropic: the last three blocks, as timm's plain ViTs (out_indices=3)
    feature_cfg = dict(feature_cls="getter", out_indices=(0, 1, 2, 3) if not isotropic else 3)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **model_args,
    )


@register_model
def conv2former_n(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return cast(Conv2Former, _create("conv2former_n", pretrained, **kwargs))


@register_model
def conv2former_t(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return cast(Conv2Former, _create("conv2former_t", pretrained, **kwargs))


@register_model
def conv2former_s(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return cast(Conv2Former, _create("conv2former_s", pretrained, **kwargs))


@register_model
def conv2former_b(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return cast(Conv2Former, _create("conv2former_b", pretrained, **kwargs))


@register_model
def conv2former_b_22k(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return cast(Conv2Former, _create("conv2former_b_22k", pretrained, **kwargs))


@register_model
def conv2former_l(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    return cast(Conv2Former, _create("conv2former_l", pretrained, **kwargs))


@register_model
def conv2former_demo(pretrained: bool = False, **kwargs: Any) -> Conv2Former:
    """A tiny Conv2Former (same blocks) that trains at a few steps per second on 2 CPU cores."""
    return cast(Conv2Former, _create("conv2former_demo", pretrained, **kwargs))


@register_model
def conv2former_is(pretrained: bool = False, **kwargs: Any) -> Conv2FormerIsotropic:
    return cast(Conv2FormerIsotropic, _create("conv2former_is", pretrained, **kwargs))


@register_model
def conv2former_is_convs(pretrained: bool = False, **kwargs: Any) -> Conv2FormerIsotropic:
    return cast(Conv2FormerIsotropic, _create("conv2former_is_convs", pretrained, **kwargs))


@register_model
def conv2former_ib(pretrained: bool = False, **kwargs: Any) -> Conv2FormerIsotropic:
    return cast(Conv2FormerIsotropic, _create("conv2former_ib", pretrained, **kwargs))


@register_model
def conv2former_ib_convs(pretrained: bool = False, **kwargs: Any) -> Conv2FormerIsotropic:
    return cast(Conv2FormerIsotropic, _create("conv2former_ib_convs", pretrained, **kwargs))
